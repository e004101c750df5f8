//! The fuzz targets of diskferry, as plain functions over a byte slice.
//!
//! Both drivers call these: the libFuzzer entry points in `fuzz_targets/`
//! (`cargo +nightly fuzz run TARGET`) and the stable-toolchain runner
//! `src/bin/replay.rs` (corpus replay plus bounded random mutation). A target
//! panics only when diskferry broke one of its promises: a decoder panicked,
//! or a checked invariant (named in the panic message) does not hold.
#![forbid(unsafe_code)]

use std::io::{self, Read, Write};

use diskferry::nbd::conn::{ClientConn, Cmd, RecvTarget, ReplyEvent};
use diskferry::nbd::handshake::{self, ExportInfo};
use diskferry::nbd::{MAX_PAYLOAD_BYTES, proto};
use diskferry::wire::{self, Frame, FrameDecoder, WireError};

/// A fuzz target: bytes in, nothing out, panics only on a bug.
pub type Target = fn(&[u8]);

/// Every target by name (the names of `fuzz_targets/*.rs` and of the
/// corpus folders).
pub const TARGETS: &[(&str, Target)] = &[
    ("nbd_reply", nbd_reply),
    ("nbd_handshake", nbd_handshake),
    ("wire_frame", wire_frame),
    ("journal_decode", journal_decode),
    ("nbd_reply_bitmap", nbd_reply_bitmap),
    ("changed_areas", changed_areas),
];

/// The receiver's journal decoder: never panics; whatever it accepts
/// re-encodes to the same bytes (a version 1 journal is rewritten as the
/// current version: that re-encoding decodes to the same journal).
pub fn journal_decode(data: &[u8]) {
    use diskferry::journal::{JOURNAL_VERSION, Journal};
    if let Ok(j) = Journal::decode(data) {
        if j.version == JOURNAL_VERSION {
            assert_eq!(
                j.encode(),
                data,
                "an accepted journal must re-encode to its bytes"
            );
        } else {
            let again = Journal::decode(&j.encode()).expect("a rewritten v1 journal decodes");
            assert_eq!(
                again,
                Journal {
                    version: JOURNAL_VERSION,
                    ..j
                },
                "a v1 journal must keep its meaning when rewritten"
            );
        }
    }
}

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// Size of the export the `nbd_reply` target pretends was negotiated.
pub const REPLY_EXPORT_SIZE_BYTES: u64 = 1024 * 1024;
/// Meta context id of `base:allocation` in that export (the id qemu-nbd
/// picks, so its captured replies in the corpus decode).
pub const REPLY_CONTEXT_ID: u32 = 0;
/// The requests in flight when the `nbd_reply` input starts (cookie, cmd).
/// The seed corpus answers exactly these.
pub const REPLY_REQUESTS: [(u64, Cmd); 4] = [
    (
        1,
        Cmd::Read {
            offset: 0,
            len: 4096,
        },
    ),
    (
        2,
        Cmd::BlockStatus {
            offset: 0,
            len: 65536,
        },
    ),
    (
        3,
        Cmd::Write {
            offset: 4096,
            len: 512,
            fua: false,
        },
    ),
    (
        4,
        Cmd::Read {
            offset: 8192,
            len: 512,
        },
    ),
];
/// Upper bound on decoder steps per input (each step consumes >= 1 byte,
/// so this only guards against a decoder that stops consuming).
const MAX_REPLY_STEPS: usize = 1 << 20;

/// What a fresh handshake with structured replies and `base:allocation`
/// yields for a writable 1 MiB export.
pub fn reply_export() -> ExportInfo {
    ExportInfo {
        size_bytes: REPLY_EXPORT_SIZE_BYTES,
        transmission_flags: proto::TFLAG_HAS_FLAGS
            | proto::TFLAG_SEND_FLUSH
            | proto::TFLAG_SEND_WRITE_ZEROES,
        block_min: 1,
        block_pref: 4096,
        block_max: MAX_PAYLOAD_BYTES,
        structured_replies: true,
        meta_contexts: vec![("base:allocation".to_string(), REPLY_CONTEXT_ID)],
    }
}

/// Meta context id of `qemu:dirty-bitmap:b0` in [`bitmap_export`].
pub const REPLY_BITMAP_CONTEXT_ID: u32 = 1;

/// [`reply_export`] with a dirty bitmap negotiated next to
/// `base:allocation`, as `qemu-nbd -B b0` gives: BLOCK_STATUS replies then
/// carry one extent chunk per context.
pub fn bitmap_export() -> ExportInfo {
    let mut info = reply_export();
    info.meta_contexts
        .push(("qemu:dirty-bitmap:b0".to_string(), REPLY_BITMAP_CONTEXT_ID));
    info
}

/// `nbd_reply`: the input is everything the server sends after the
/// requests of [`REPLY_REQUESTS`] were encoded. Follows `recv_target` until
/// the first protocol error or the end of the input, and checks that every
/// event names a request in flight, lies inside it, and that each request
/// ends at most once.
pub fn nbd_reply(data: &[u8]) {
    drive_replies(data, &reply_export());
}

/// `nbd_reply_bitmap`: [`nbd_reply`] on a connection with two meta
/// contexts ([`bitmap_export`]); extents must name a negotiated context.
pub fn nbd_reply_bitmap(data: &[u8]) {
    drive_replies(data, &bitmap_export());
}

/// `changed_areas`: the changed-areas parser on arbitrary text (a 1 GiB
/// disk). What it accepts is sorted, disjoint, merged and inside the disk,
/// and plans against any allocation partition the disk.
pub fn changed_areas(data: &[u8]) {
    const DISK_BYTES: u64 = 1 << 30;
    let text = String::from_utf8_lossy(data);
    let Ok(list) = diskferry::plan::changed_areas::parse(&text, DISK_BYTES) else {
        return;
    };
    let mut end = None;
    for &(start, len) in &list.areas {
        assert!(len > 0, "empty area accepted");
        assert!(
            end.is_none_or(|e| start > e),
            "areas unsorted, overlapping or unmerged"
        );
        end = Some(start + len);
        assert!(start + len <= DISK_BYTES, "area past the disk");
    }
    // The changed areas themselves as the allocation: everything is Copy.
    let plan = list.plan(&list.areas).expect("a valid list plans");
    assert_eq!(
        plan.bytes(diskferry::plan::PassKind::Copy),
        list.changed_bytes(),
        "changed bytes that hold data must all be Copy"
    );
}

/// Drive the decoder over `data`; returns which requests ended (Done or
/// Failed) and whether the decoder refused the input.
fn drive_replies(data: &[u8], export: &ExportInfo) -> ([bool; REPLY_REQUESTS.len()], bool) {
    let mut conn = ClientConn::new(export);
    let mut header = [0u8; proto::REQUEST_BYTES];
    for (cookie, cmd) in REPLY_REQUESTS {
        if let Err(e) = conn.encode_request(cookie, cmd, &mut header) {
            panic!("harness: request {cookie} refused: {e}");
        }
    }
    let mut ended = [false; REPLY_REQUESTS.len()];
    let mut events = Vec::new();
    let mut input = data;
    for _ in 0..MAX_REPLY_STEPS {
        let n = match conn.recv_target() {
            RecvTarget::Scratch { len } => {
                let n = len.min(input.len());
                conn.scratch_mut()[..n].copy_from_slice(&input[..n]);
                n
            }
            RecvTarget::Payload {
                cookie,
                buf_offset,
                len,
            } => {
                check_inside(cookie, buf_offset, len);
                usize::try_from(len).map_or(input.len(), |len| len.min(input.len()))
            }
        };
        if n == 0 {
            return (ended, false);
        }
        input = &input[n..];
        if conn.advance(n, &mut events).is_err() {
            return (ended, true);
        }
        for event in events.drain(..) {
            check_event(&event, export, &mut ended);
        }
    }
    panic!("ClientConn took {MAX_REPLY_STEPS} steps without consuming the input");
}

fn request_index(cookie: u64) -> usize {
    REPLY_REQUESTS
        .iter()
        .position(|(c, _)| *c == cookie)
        .unwrap_or_else(|| panic!("event for cookie {cookie}, which was never sent"))
}

/// A READ payload or hole must lie inside the READ's buffer.
fn check_inside(cookie: u64, buf_offset: u32, len: u32) {
    let i = request_index(cookie);
    let Cmd::Read { len: read_len, .. } = REPLY_REQUESTS[i].1 else {
        panic!("payload or hole for cookie {cookie}, which is not a READ");
    };
    let end = u64::from(buf_offset) + u64::from(len);
    assert!(
        end <= u64::from(read_len),
        "cookie {cookie}: bytes [{buf_offset}, {end}) outside the {read_len}-byte READ"
    );
}

fn check_event(event: &ReplyEvent, export: &ExportInfo, ended: &mut [bool]) {
    match event {
        ReplyEvent::Hole {
            cookie,
            buf_offset,
            len,
        } => check_inside(*cookie, *buf_offset, *len),
        ReplyEvent::BlockStatus {
            cookie,
            context_id,
            extents,
        } => {
            let i = request_index(*cookie);
            let Cmd::BlockStatus { len, .. } = REPLY_REQUESTS[i].1 else {
                panic!("block status for cookie {cookie}, which is not BLOCK_STATUS");
            };
            assert!(
                export.context_name(*context_id).is_some(),
                "unnegotiated context {context_id}"
            );
            assert!(!extents.is_empty(), "block status without extents");
            assert!(
                extents.iter().all(|e| e.len > 0),
                "zero-length extent passed through"
            );
            // The decoder truncates the last extent to the request end.
            let total: u64 = extents.iter().map(|e| u64::from(e.len)).sum();
            assert!(total <= u64::from(len), "extents reach past the request");
        }
        ReplyEvent::Done { cookie } | ReplyEvent::Failed { cookie, .. } => {
            let i = request_index(*cookie);
            assert!(!ended[i], "cookie {cookie} ended twice");
            ended[i] = true;
        }
    }
}

/// An NBD server that has said `input` and then hung up; what the client
/// writes is thrown away.
struct ScriptedServer<'a> {
    input: &'a [u8],
}

impl Read for ScriptedServer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for ScriptedServer<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `nbd_handshake`: the input is everything the server sends during the
/// handshake. A successful negotiation must respect the documented bounds.
pub fn nbd_handshake(data: &[u8]) {
    let mut server = ScriptedServer { input: data };
    let Ok(info) = handshake::negotiate(&mut server, "", &["base:allocation"]) else {
        return;
    };
    assert!(info.block_min >= 1, "block_min 0 accepted");
    assert!(
        info.block_max <= MAX_PAYLOAD_BYTES,
        "block_max {} above the payload bound",
        info.block_max
    );
    assert!(
        info.meta_contexts.len() <= handshake::MAX_META_CONTEXTS,
        "too many meta contexts"
    );
}

/// `wire_frame`: `decode_any` over the input after its first four bytes,
/// the same bytes fed to a [`FrameDecoder`] in pieces whose sizes come
/// from the first four bytes; both must agree, and every decoded frame
/// must survive encode → decode unchanged.
pub fn wire_frame(data: &[u8]) {
    let (sizes, stream) = data.split_at(data.len().min(4));
    let whole = wire::decode_any(stream);
    let (frames, piecewise_err, tail) = decode_in_pieces(sizes, stream);
    match (&whole, piecewise_err) {
        (Ok(all), None) => {
            assert!(tail.is_none(), "decode_any accepted a truncated frame");
            assert_eq!(all, &frames, "one-shot and piecewise decoding differ");
        }
        (Err(WireError::Truncated { needed_bytes }), None) => {
            assert_eq!(tail, Some(*needed_bytes), "truncation reported differently");
        }
        (Err(a), Some(b)) => assert_eq!(a, &b, "one-shot and piecewise errors differ"),
        (one_shot, piecewise) => {
            panic!("one-shot gave {one_shot:?}, piecewise gave error {piecewise:?}")
        }
    }
    for frame in &frames {
        round_trip(frame);
    }
}

/// Feeds `stream` to one decoder in pieces of 1..=256 bytes. Returns the
/// frames, the error if any, and (when the input ended mid-frame) how many
/// bytes the decoder still needed.
fn decode_in_pieces(
    sizes: &[u8],
    mut stream: &[u8],
) -> (Vec<Frame>, Option<WireError>, Option<usize>) {
    let mut decoder = FrameDecoder::new();
    let mut frames = Vec::new();
    let mut piece_index = 0usize;
    while !stream.is_empty() {
        let size = sizes
            .get(piece_index % sizes.len().max(1))
            .map_or(1, |&b| usize::from(b) + 1);
        piece_index += 1;
        let (mut piece, rest) = stream.split_at(size.min(stream.len()));
        stream = rest;
        while !piece.is_empty() {
            let used = decoder.feed(piece);
            piece = &piece[used..];
            match decoder.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => assert!(used > 0, "FrameDecoder stopped taking bytes"),
                Err(e) => return (frames, Some(e), None),
            }
        }
    }
    let tail = decoder.is_mid_frame().then(|| decoder.need());
    (frames, None, tail)
}

fn round_trip(frame: &Frame) {
    let mut bytes = Vec::new();
    if let Err(e) = frame.encode(&mut bytes) {
        panic!("decoded frame refused by the encoder ({e}): {frame:?}");
    }
    match wire::decode_frame(&bytes) {
        Ok((again, used)) => {
            assert_eq!(used, bytes.len(), "re-encoded frame not fully used");
            assert_eq!(&again, frame, "frame changed across encode → decode");
        }
        Err(e) => panic!("re-encoded frame does not decode ({e}): {frame:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed two-context seeds are well-formed replies: every
    /// request ends and the decoder accepts all of it, so mutations start
    /// from deep inside the BLOCK_STATUS path.
    #[test]
    fn bitmap_seeds_decode_cleanly() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/nbd_reply_bitmap");
        let seed = std::fs::read(dir.join("two-contexts")).unwrap();
        assert_eq!(drive_replies(&seed, &bitmap_export()), ([true; 4], false));
        // The same reply with only base:allocation negotiated is refused.
        assert!(drive_replies(&seed, &reply_export()).1);
        let seed = std::fs::read(dir.join("bitmap-split-none")).unwrap();
        assert_eq!(
            drive_replies(&seed, &bitmap_export()),
            ([false, true, false, false], false)
        );
    }
}
