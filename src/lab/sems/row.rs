//! A simulated call's row, key by key in SEMS's order: what the call drew first, then the
//! rest of its keys drawn in the order a row lists them, so that the same seed gives the
//! same bytes whatever the layout (`Style`).

use super::{NODE_ID, Style, customer_of, json_string};

/// What a new call draws before its row is written out.
pub(super) struct Drawn {
    pub(super) serial: u64,
    pub(super) account: i64,
    pub(super) local_tag: String,
    pub(super) start_text: String,
    pub(super) connect_text: String,
    pub(super) dst_prefix_in: String,
    pub(super) name: String,
    pub(super) rate: String,
    pub(super) other_rate: String,
    pub(super) interval: String,
    pub(super) port: String,
}

/// One of `list`, at random.
pub(super) fn pick(rng: &mut fastrand::Rng, list: &[&'static str]) -> &'static str {
    list[rng.usize(..list.len())]
}

/// A number as a caller dials it: a country or network prefix, then six to eight digits.
pub(super) fn phone_number(rng: &mut fastrand::Rng) -> String {
    const PREFIXES: [&str; 8] = ["380", "44", "49", "1", "7", "971", "123", "4930"];
    format!(
        "{}{}",
        PREFIXES[rng.usize(..PREFIXES.len())],
        rng.u64(1_000_000..100_000_000)
    )
}

/// A SIP identity header's value, as SEMS writes it (often empty or null).
fn sip_header(rng: &mut fastrand::Rng) -> String {
    pick(
        rng,
        &["null", "\"\"", "\"anonymous\"", "\"<sip:1@x>\"", "\"Id\""],
    )
    .to_owned()
}

fn int(n: i64) -> String {
    n.to_string()
}

/// A row's first keys, in SEMS's order: the snapshot's, the legs', the call's identity and
/// its parties.
pub(super) fn leg_fields(
    rng: &mut fastrand::Rng,
    style: Style,
    d: &Drawn,
) -> Vec<(&'static str, String)> {
    let s = |text: &str| json_string(style, text);
    let (serial, account, start_text) = (d.serial, d.account, d.start_text.as_str());
    vec![
        ("id", String::new()),
        ("snapshot_timestamp", String::new()),
        ("snapshot_date", String::new()),
        ("node_id", NODE_ID.to_string()),
        ("pop_id", int(4)),
        ("cdr_born_time", s(start_text)),
        ("start_time", s(start_text)),
        ("connect_time", d.connect_text.clone()),
        ("start_date", s(&start_text[..10])),
        ("end_time", String::new()),
        ("legB_remote_port", int(5060)),
        ("legB_local_port", int(5061)),
        ("legA_remote_port", int(5060)),
        ("legA_local_port", int(5061)),
        ("legB_remote_ip", s("10.1.2.3")),
        ("legB_local_ip", s("10.1.2.4")),
        (
            "legA_remote_ip",
            s(&format!("192.168.88.{}", rng.u8(1..255))),
        ),
        ("legA_local_ip", s("192.168.88.24")),
        (
            "orig_call_id",
            s(&format!("{}-{}-{serial}", rng.u32(..), rng.u32(..))),
        ),
        ("term_call_id", s(&format!("8-{:X}", rng.u64(..)))),
        ("local_tag", s(&d.local_tag)),
        ("global_tag", s("")),
        ("time_limit", int(7200)),
        ("dump_level_id", int(0)),
        ("audio_record_enabled", int(0)),
        ("attempt_num", int(1)),
        ("resources", s("")),
        ("active_resources", s("")),
        ("customer_id", int(customer_of(account))),
        ("customer_acc_id", int(account)),
        ("vendor_id", int(77)),
        ("vendor_acc_id", int(78)),
        ("customer_auth_id", int(20085)),
    ]
}

/// The rest of a row, in SEMS's order: the destination and its rates, the numbers, the
/// domains and the SIP identity headers.
pub(super) fn rating_fields(
    rng: &mut fastrand::Rng,
    style: Style,
    d: &Drawn,
) -> Vec<(&'static str, String)> {
    let s = |text: &str| json_string(style, text);
    vec![
        ("destination_id", int(rng.i64(1..5_000_000))),
        ("destination_prefix", s(&d.dst_prefix_in[..2])),
        ("dialpeer_id", int(rng.i64(1..2_000_000))),
        ("dialpeer_prefix", s("380")),
        ("orig_gw_id", int(19)),
        ("term_gw_id", int(20)),
        ("routing_group_id", int(24)),
        ("rateplan_id", int(18)),
        ("routing_plan_id", int(3)),
        ("destination_initial_rate", d.rate.clone()),
        ("destination_next_rate", d.other_rate.clone()),
        ("destination_initial_interval", d.interval.clone()),
        (
            "destination_next_interval",
            pick(rng, &["60", "1"]).to_owned(),
        ),
        ("destination_fee", s(pick(rng, &["0.0", "0.01"]))),
        ("destination_rate_policy_id", int(1)),
        ("dialpeer_initial_rate", s("0.005")),
        ("dialpeer_next_rate", s("0.001")),
        ("dialpeer_initial_interval", int(1)),
        ("dialpeer_next_interval", int(1)),
        ("dialpeer_fee", s("0.0")),
        ("src_name_in", d.name.clone()),
        ("src_name_out", s("")),
        ("src_prefix_in", s(&phone_number(rng))),
        ("src_prefix_out", s("")),
        ("dst_prefix_in", s(&d.dst_prefix_in)),
        ("dst_prefix_out", s("")),
        ("src_prefix_routing", s(&phone_number(rng))),
        ("dst_prefix_routing", s(&phone_number(rng))),
        (
            "auth_orig_ip",
            s(&format!("10.20.{}.{}", rng.u8(..), rng.u8(..))),
        ),
        ("auth_orig_port", d.port.clone()),
        ("src_network_id", int(1522)),
        ("src_country_id", int(222)),
        ("dst_country_id", int(222)),
        ("dst_network_id", int(1522)),
        ("lrn", "null".into()),
        ("lnp_database_id", "null".into()),
        ("from_domain", s("example.org")),
        ("to_domain", s("example.com")),
        ("ruri_domain", s("10.0.0.1")),
        ("src_area_id", "null".into()),
        ("dst_area_id", "null".into()),
        ("routing_tag_ids", "[1,2]".into()),
        ("customer_acc_check_balance", int(1)),
        ("destination_reverse_billing", int(0)),
        ("dialpeer_reverse_billing", int(0)),
        ("customer_acc_vat", s("0")),
        ("customer_auth_name", s("test auth")),
        ("metadata", "null".into()),
        ("diversion_in", sip_header(rng)),
        ("pai_in", sip_header(rng)),
        ("ppi_in", sip_header(rng)),
        ("privacy_in", sip_header(rng)),
        ("rpid_in", sip_header(rng)),
        ("rpid_privacy_in", sip_header(rng)),
        ("auth_orig_transport_protocol_id", int(rng.i64(1..4))),
    ]
}

/// Keys a real row of the old layout has and the agent never reads, some of them nested.
pub(super) fn legacy_fields(rng: &mut fastrand::Rng) -> [(&'static str, String); 6] {
    let s = |text: &str| json_string(Style::Legacy, text);
    [
        ("lega_user_agent", s(&format!("Yeti-SBC/1.{}", rng.u8(..)))),
        (
            "lega_headers",
            format!(r#"{{"x-orig-ip":"192.168.88.{}"}}"#, rng.u8(..)),
        ),
        ("legb_headers", "{}".into()),
        ("pdd", format!("{}", rng.f32())),
        ("early_media_present", "false".into()),
        ("auth_orig_protocol_name", s("UDP")),
    ]
}
