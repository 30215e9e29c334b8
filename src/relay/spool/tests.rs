//! The spool's unit tests, in a file of their own so that spool.rs holds only what the
//! relay runs: naming, the spooler's passes (a restart after a crash, a snapshot no URL
//! folder can take, what is dropped and what is retried), and the folders made again.

use super::*;

#[test]
fn names_round_trip_and_sort_like_numbers() {
    let a = SpoolName {
        seq: 9,
        token: token(&[1, 2], 0xabc),
    };
    let b = SpoolName {
        seq: 10,
        token: token(&[1], 1),
    };
    let (fa, fb) = (a.file_name(COMPRESSED), b.file_name(COMPRESSED));
    assert!(fa < fb, "{fa} {fb}");
    assert_eq!(SpoolName::parse(&fa, COMPRESSED), Some(a.clone()));
    assert_eq!(a.hash(), Some(0xabc));
    assert_eq!(SpoolName::parse(&fa, RAW), None);
    assert_eq!(SpoolName::parse("url", COMPRESSED), None);
    assert_eq!(SpoolName::parse("1.x.jsonl.gz", COMPRESSED), None);
    assert_eq!(
        SpoolName::parse(&a.file_name(PARTIAL), COMPRESSED),
        None,
        "a partial file is not a spooled one"
    );
}

/// A spool over a temporary folder with one URL folder, as a restart finds it.
fn spool_with(
    files: &[(&str, &[u8])],
) -> (
    tempfile::TempDir,
    Spooler,
    tokio::sync::mpsc::UnboundedReceiver<Spooled>,
    u64,
) {
    let root = tempfile::tempdir().unwrap();
    let url_dir = root.path().join("u");
    std::fs::create_dir_all(root.path().join(PENDING)).unwrap();
    std::fs::create_dir_all(root.path().join(INCOMING)).unwrap();
    for (name, content) in files {
        std::fs::write(root.path().join(name), content).unwrap();
    }
    let first_seq = prepare(root.path(), std::slice::from_ref(&url_dir)).unwrap();
    let (news, news_rx) = tokio::sync::mpsc::unbounded_channel();
    let spooler = Spooler {
        pending: root.path().join(PENDING),
        urls: vec![UrlFolder {
            dir: url_dir,
            label: "http://ch:8123/".into(),
            news,
            metrics: crate::metrics::Metrics::new().relay("http://ch:8123/"),
        }],
        stopping: Arc::new(AtomicBool::new(false)),
        backlog: Arc::new(Backlog::new(0, Gauge::default())),
        retry_max: std::time::Duration::from_millis(100),
        errors: Throttled::every(LOG_EVERY),
    };
    (root, spooler, news_rx, first_seq)
}

#[test]
fn a_restart_finishes_what_a_crash_left_and_drops_what_it_tore() {
    let rows = b"{\"node_id\":1}\n";
    let whole = SpoolName {
        seq: 7,
        token: token(&[1], xxhash_rust::xxh3::xxh3_128(rows)),
    };
    let torn = SpoolName {
        seq: 8,
        token: token(
            &[1],
            xxhash_rust::xxh3::xxh3_128(b"{\"node_id\":1}\n{\"x\""),
        ),
    };
    let pending = |n: &SpoolName, suffix| format!("{PENDING}/{}", n.file_name(suffix));
    let (root, mut spooler, mut news, first_seq) = spool_with(&[
        (&format!("{INCOMING}/00000000000000000009.jsonl"), b"{\"cut"),
        (&pending(&whole, RAW), rows),
        // A crash mid-compress left a partial file.
        (&pending(&whole, PARTIAL), b"garbage"),
        (&pending(&torn, RAW), b"{\"node_id\":1}\n"),
    ]);
    assert_eq!(first_seq, 9, "numbers go on after the largest pending one");
    assert_eq!(
        std::fs::read_dir(root.path().join(INCOMING))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(spooler.spool_pending(), Pass::Done);

    let linked = spooler.urls[0].dir.join(whole.file_name(COMPRESSED));
    let mut text = String::new();
    flate2::read::GzDecoder::new(File::open(&linked).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text.as_bytes(), rows);
    let spooled = news.try_recv().unwrap();
    assert_eq!(
        (spooled.name, spooled.bytes),
        (whole.clone(), linked.metadata().unwrap().len())
    );
    assert!(news.try_recv().is_err(), "the torn one is not announced");
    assert_eq!(spooler.urls[0].metrics.dropped.get(), 1);
    assert_eq!(
        std::fs::read_dir(root.path().join(PENDING))
            .unwrap()
            .count(),
        0,
        "pending is empty"
    );

    // The same snapshot pending again (a crash after linking): the link stays.
    std::fs::write(root.path().join(pending(&whole, RAW)), rows).unwrap();
    spooler.spool_pending();
    assert_eq!(news.try_recv().unwrap().name, whole);
    assert!(linked.exists());
}

#[test]
fn a_snapshot_no_url_folder_can_take_stays_pending_until_one_can() {
    let rows = b"{\"node_id\":1}\n";
    let name = SpoolName {
        seq: 1,
        token: token(&[1], xxhash_rust::xxh3::xxh3_128(rows)),
    };
    let raw = format!("{PENDING}/{}", name.file_name(RAW));
    let (root, mut spooler, mut news, _) = spool_with(&[(&raw, rows)]);
    spooler.backlog.add(rows.len() as u64);
    // The URL folder is a file: no link can be made, and none made again.
    let dir = spooler.urls[0].dir.clone();
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::write(&dir, b"").unwrap();
    assert_eq!(spooler.spool_pending(), Pass::Retry);
    assert!(root.path().join(&raw).exists(), "kept for a retry");
    assert_eq!(spooler.urls[0].metrics.dropped.get(), 0);
    assert_eq!(spooler.backlog.get(), rows.len() as u64);
    assert!(news.try_recv().is_err());
    // The folder deleted instead: made again, with its url file, and the snapshot goes.
    std::fs::remove_file(&dir).unwrap();
    assert_eq!(spooler.spool_pending(), Pass::Done);
    assert_eq!(news.try_recv().unwrap().name, name);
    assert!(dir.join(URL_FILE).exists());
    assert!(!root.path().join(&raw).exists());
    assert_eq!(spooler.backlog.get(), 0);
}

#[test]
fn only_a_torn_or_vanished_snapshot_is_dropped() {
    let full = || SpoolError::Io(io::Error::from_raw_os_error(libc::ENOSPC));
    assert_eq!(fate(&SpoolError::Torn, true), Fate::Drop);
    assert_eq!(fate(&full(), true), Fate::Retry);
    assert_eq!(
        fate(
            &SpoolError::Io(io::Error::from_raw_os_error(libc::EMFILE)),
            true
        ),
        Fate::Retry
    );
    assert_eq!(
        fate(&SpoolError::Io(io::ErrorKind::NotFound.into()), false),
        Fate::Drop
    );
    assert_eq!(fate(&full(), false), Fate::Drop);
}

#[test]
fn a_deleted_folder_is_made_again_once() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("gone/deeper");
    let file = dir.join("f");
    let mut calls = 0;
    in_dir(&dir, || {
        calls += 1;
        std::fs::write(&file, b"x")
    })
    .unwrap();
    assert_eq!((calls, file.exists()), (2, true));
    // A source that is missing is not a missing folder: no retry.
    let err = in_dir(&dir, || std::fs::rename(root.path().join("nothing"), &file));
    assert_eq!(err.unwrap_err().kind(), io::ErrorKind::NotFound);
}

#[test]
fn tokens_name_the_nodes_and_the_hash() {
    assert_eq!(token(&[7], 0xff), format!("n7-{:032x}", 0xff));
    assert_eq!(token(&[], 1), format!("n-{:032x}", 1));
    let many: Vec<i64> = (1..=10).collect();
    assert!(token(&many, 1).starts_with("n1_2_3_4_5_6_7_8_etc-"));
    let negative = token(&[-3], 5);
    assert_eq!(
        SpoolName {
            seq: 1,
            token: negative
        }
        .hash(),
        Some(5)
    );
}
