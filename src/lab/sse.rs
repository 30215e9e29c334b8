//! A live stream (SPEC 7) read as a client reads it: the answer's head, then the chunked
//! body, then Server-Sent Events. The benchmark's thousand clients and the integration
//! tests read streams through this one reader, so both see exactly what a browser's
//! `EventSource` would, and neither carries a parser of its own.
//!
//! It is fed bytes as they come and returns the events they completed. A snapshot event
//! of a big account is megabytes: each block is scanned once, from where the last look
//! stopped, and data longer than the reader's `max_data` is not kept (the event still is).

use anyhow::{Context, bail};

/// One event: its `id`, name and data, and the `retry:` that came with it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    pub id: Option<u64>,
    pub event: String,
    /// Empty when it was longer than the reader keeps.
    pub data: String,
    pub retry: Option<String>,
}

/// The reader of one stream's bytes.
#[derive(Debug)]
pub struct EventReader {
    /// The answer's head (status line and headers, up to the blank line), once read.
    head: Option<Vec<u8>>,
    /// The body's chunks, and the text they made, not yet made into events.
    chunks: Dechunker,
    text: Vec<u8>,
    /// Where in `text` to look for the next event's end.
    scanned: usize,
    max_data: usize,
}

impl EventReader {
    /// A reader that keeps data up to `max_data` bytes long.
    pub fn new(max_data: usize) -> EventReader {
        EventReader {
            head: None,
            chunks: Dechunker::default(),
            text: Vec::new(),
            scanned: 0,
            max_data,
        }
    }

    /// The answer's head, once it has come whole.
    pub fn head(&self) -> Option<&[u8]> {
        self.head.as_deref()
    }

    /// Whether the body's last chunk has come.
    pub fn ended(&self) -> bool {
        self.chunks.ended()
    }

    /// The events that `bytes` completed, comments (heartbeats) skipped.
    pub fn feed(&mut self, bytes: &[u8]) -> anyhow::Result<Vec<Event>> {
        let body = match &self.head {
            Some(_) => bytes,
            None => {
                // The head's bytes wait in the chunks' buffer until it is whole.
                self.chunks.raw.extend_from_slice(bytes);
                let raw = &mut self.chunks.raw;
                let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                    return Ok(Vec::new());
                };
                self.head = Some(raw.drain(..end + 4).collect());
                &[]
            }
        };
        self.chunks.feed(body, &mut self.text)?;
        let mut events = Vec::new();
        while let Some(end) = (self.text[self.scanned..].windows(2)).position(|w| w == b"\n\n") {
            let block_end = self.scanned + end;
            let event = self.event(&self.text[..block_end])?;
            events.extend(event);
            self.text.drain(..block_end + 2);
            self.scanned = 0;
        }
        self.scanned = self.text.len().saturating_sub(1);
        Ok(events)
    }

    /// The event one block (its lines, without the blank line) makes; `None` for a
    /// block of comments.
    fn event(&self, block: &[u8]) -> anyhow::Result<Option<Event>> {
        let mut event = Event::default();
        for line in block.split(|&b| b == b'\n') {
            if line.is_empty() || line.starts_with(b":") {
                continue;
            }
            let Some(at) = line.windows(2).position(|w| w == b": ") else {
                bail!(
                    "a line SSE does not know: {:?}",
                    String::from_utf8_lossy(line)
                );
            };
            let (field, value) = (&line[..at], &line[at + 2..]);
            if field == b"data" {
                if value.len() <= self.max_data {
                    event.data = String::from_utf8(value.to_vec()).context("UTF-8 data")?;
                }
                continue;
            }
            let value = std::str::from_utf8(value).context("a UTF-8 field")?;
            match field {
                b"id" => event.id = Some(value.parse().context("a numeric id")?),
                b"event" => event.event = value.to_owned(),
                b"retry" => event.retry = Some(value.to_owned()),
                _ => bail!(
                    "a field SSE does not know: {:?}",
                    String::from_utf8_lossy(line)
                ),
            }
        }
        Ok((!event.event.is_empty()).then_some(event))
    }
}

/// A chunked body (RFC 9112 7.1) decoded as its bytes come, chunk extensions ignored.
#[derive(Debug, Default)]
pub struct Dechunker {
    /// Bytes not yet decoded: a chunk not yet whole.
    raw: Vec<u8>,
    /// The last chunk has come.
    ended: bool,
}

impl Dechunker {
    /// Appends to `body` the data of the chunks `bytes` completed.
    pub fn feed(&mut self, bytes: &[u8], body: &mut Vec<u8>) -> anyhow::Result<()> {
        self.raw.extend_from_slice(bytes);
        let mut used = 0;
        while !self.ended
            && let Some(line) = self.raw[used..].windows(2).position(|w| w == b"\r\n")
        {
            let size_text = std::str::from_utf8(&self.raw[used..used + line])?;
            let size_text = size_text.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_text, 16)
                .with_context(|| format!("a chunk size {size_text:?}"))?;
            let start = used + line + 2;
            if size == 0 {
                (self.ended, used) = (true, start);
            } else if self.raw.len() >= start + size + 2 {
                body.extend_from_slice(&self.raw[start..start + size]);
                used = start + size + 2;
            } else {
                break;
            }
        }
        self.raw.drain(..used);
        Ok(())
    }

    /// Whether the last chunk has come.
    pub fn ended(&self) -> bool {
        self.ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_come_whole_whatever_the_bytes_are_cut_into() {
        let body = "retry: 2000\n\n: heartbeat\n\nid: 1\nevent: snapshot\ndata: {\"data\":[]}\n\n\
                    id: 2\nevent: changes\ndata: {\"added\":[1]}\n\nevent: end\ndata: {\"reason\":\"slow\"}\n\n";
        let mut wire = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n".to_vec();
        for piece in body.as_bytes().chunks(7) {
            wire.extend(format!("{:x}\r\n", piece.len()).bytes());
            wire.extend_from_slice(piece);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"0\r\n\r\n");
        for cut in [1, 3, 64, wire.len()] {
            let mut reader = EventReader::new(12);
            let mut events = Vec::new();
            for bytes in wire.chunks(cut) {
                events.extend(reader.feed(bytes).unwrap());
            }
            let names: Vec<_> = events.iter().map(|e| (e.id, e.event.as_str())).collect();
            assert_eq!(
                names,
                [(Some(1), "snapshot"), (Some(2), "changes"), (None, "end")]
            );
            assert_eq!(events[0].data, "{\"data\":[]}");
            assert_eq!(events[1].data, "", "longer than 12 bytes: not kept");
            assert!(reader.ended());
            assert!(reader.head().unwrap().starts_with(b"HTTP/1.1 200"));
        }
    }

    #[test]
    fn a_line_sse_does_not_know_is_an_error() {
        let mut reader = EventReader::new(usize::MAX);
        reader.feed(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        assert!(reader.feed(b"a\r\nbogus: x\n\n\r\n").is_err());
    }

    #[test]
    fn chunks_decode_across_cuts_with_extensions_ignored() {
        let wire = b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        for cut in 1..wire.len() {
            let (mut chunks, mut body) = (Dechunker::default(), Vec::new());
            chunks.feed(&wire[..cut], &mut body).unwrap();
            chunks.feed(&wire[cut..], &mut body).unwrap();
            assert_eq!((body.as_slice(), chunks.ended()), (&b"abcde"[..], true));
        }
        let (mut chunks, mut body) = (Dechunker::default(), Vec::new());
        chunks.feed(b"3\r\nab", &mut body).unwrap();
        assert!(
            body.is_empty() && !chunks.ended(),
            "a chunk cut is not yet data"
        );
    }
}
