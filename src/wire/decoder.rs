//! [`FrameDecoder`]: the incremental, sans-IO frame decoder.
//!
//! A frame is received in up to three steps: the 12-byte header, for DATA
//! the 48-byte fixed part, then the payload. Each step is validated as soon
//! as it is complete, so a payload buffer is only allocated for a frame
//! whose header and fixed part passed every check, and never larger than the
//! bound of its type ([`FrameType::payload_bounds`]).
//!
//! Two ways to drive it:
//!
//! * copy in: `feed(bytes)` consumes up to the end of the current frame and
//!   returns how many bytes it took; `next_frame()` then yields the frame.
//!   [`FrameDecoder::decode_from`] does both over a slice it advances.
//! * read in place: `read(stream, decoder.buf_mut())` then
//!   `decoder.advance(n)`; `buf_mut().len() == need()`, so a DATA payload is
//!   received straight into the buffer that the frame will own.

use super::WireError;
use super::header::{FrameType, HEADER_LEN, Header};
use super::msg::{DATA_HEAD_BYTES, DATA_HEAD_LEN, Data, DataHead, Frame};

/// Non-DATA payload buffers above this are released after use (a WELCOME
/// may be 16 MiB; it should not stay resident).
const KEEP_BODY_CAPACITY_BYTES: usize = 64 * 1024;

#[derive(Debug)]
enum Stage {
    Header {
        got: usize,
    },
    DataHead {
        header: Header,
        got: usize,
    },
    Payload {
        header: Header,
        data: Option<DataHead>,
        got: usize,
    },
    Ready(Frame),
    Failed(WireError),
}

/// Incremental decoder of one stream's frames. Errors are sticky: after
/// one, the stream is unusable and every call returns the same error.
#[derive(Debug)]
pub struct FrameDecoder {
    stage: Stage,
    header: [u8; HEADER_LEN],
    data_head: [u8; DATA_HEAD_LEN],
    body: Vec<u8>,
    spare: Option<Vec<u8>>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder waiting for the first header. Allocates nothing.
    pub fn new() -> Self {
        FrameDecoder {
            stage: Stage::Header { got: 0 },
            header: [0; HEADER_LEN],
            data_head: [0; DATA_HEAD_LEN],
            body: Vec::new(),
            spare: None,
        }
    }

    /// Bytes still needed to finish the current step (header, DATA fixed
    /// part, or payload). 0 when a frame is ready or after an error.
    pub fn need(&self) -> usize {
        match &self.stage {
            Stage::Header { got } => HEADER_LEN - got,
            Stage::DataHead { got, .. } => DATA_HEAD_LEN - got,
            Stage::Payload { got, .. } => self.body.len() - got,
            Stage::Ready(_) | Stage::Failed(_) => 0,
        }
    }

    /// True when some bytes of a frame were received but not the whole
    /// frame (a clean end of stream is only possible when this is false).
    pub fn is_mid_frame(&self) -> bool {
        !matches!(
            self.stage,
            Stage::Header { got: 0 } | Stage::Ready(_) | Stage::Failed(_)
        )
    }

    /// While the payload of a DATA frame is being received: its codec and
    /// how many payload bytes arrived so far (the next bytes read into
    /// [`Self::buf_mut`] continue from there).
    pub fn data_payload_progress(&self) -> Option<(super::Codec, usize)> {
        match &self.stage {
            Stage::Payload {
                data: Some(head),
                got,
                ..
            } => Some((head.codec, *got)),
            _ => None,
        }
    }

    /// Where the next received bytes go; its length is [`Self::need`].
    pub fn buf_mut(&mut self) -> &mut [u8] {
        match &self.stage {
            Stage::Header { got } => &mut self.header[*got..],
            Stage::DataHead { got, .. } => &mut self.data_head[*got..],
            Stage::Payload { got, .. } => &mut self.body[*got..],
            Stage::Ready(_) | Stage::Failed(_) => &mut [],
        }
    }

    /// Records that `n` bytes were written into [`Self::buf_mut`]. `n` is
    /// clamped to [`Self::need`].
    pub fn advance(&mut self, n: usize) {
        let n = n.min(self.need());
        if n == 0 {
            return;
        }
        let next = match std::mem::replace(&mut self.stage, Stage::Header { got: 0 }) {
            Stage::Header { got } => self.after_header(got + n),
            Stage::DataHead { header, got } => self.after_data_head(header, got + n),
            Stage::Payload { header, data, got } => self.after_payload(header, data, got + n),
            done @ (Stage::Ready(_) | Stage::Failed(_)) => done,
        };
        self.stage = next;
    }

    /// Copies in as much of `bytes` as the current frame still needs (never
    /// past its end) and returns how many bytes were taken.
    pub fn feed(&mut self, bytes: &[u8]) -> usize {
        let mut used = 0;
        loop {
            let n = self.need().min(bytes.len() - used);
            if n == 0 {
                return used;
            }
            self.buf_mut()[..n].copy_from_slice(&bytes[used..used + n]);
            self.advance(n);
            used += n;
        }
    }

    /// The completed frame, if any. After an error every call returns it.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        match std::mem::replace(&mut self.stage, Stage::Header { got: 0 }) {
            Stage::Ready(frame) => Ok(Some(frame)),
            Stage::Failed(e) => {
                self.stage = Stage::Failed(e.clone());
                Err(e)
            }
            other => {
                self.stage = other;
                Ok(None)
            }
        }
    }

    /// Feeds from `input` (advancing it past what was used) and returns the
    /// next frame, or `None` when `input` ran out first.
    pub fn decode_from(&mut self, input: &mut &[u8]) -> Result<Option<Frame>, WireError> {
        if matches!(
            self.stage,
            Stage::Header { .. } | Stage::DataHead { .. } | Stage::Payload { .. }
        ) {
            let used = self.feed(input);
            *input = &input[used..];
        }
        self.next_frame()
    }

    /// Gives back a DATA payload buffer once the caller is done with it, so
    /// the next DATA frame reuses it instead of allocating. Only one spare
    /// is kept (the larger); give back only buffers this decoder handed out,
    /// or the one-frame memory bound no longer holds.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        let keep = self
            .spare
            .as_ref()
            .is_none_or(|s| s.capacity() < buf.capacity());
        if keep {
            // Kept at its length: the next payload of that size or less
            // reuses the bytes without zeroing them again (they are all
            // overwritten by the payload before the frame is handed out).
            self.spare = Some(buf);
        }
    }

    /// Bytes of payload buffer this decoder holds (for bound tests).
    pub fn buffered_capacity_bytes(&self) -> usize {
        self.body.capacity() + self.spare.as_ref().map_or(0, Vec::capacity)
    }

    fn after_header(&mut self, got: usize) -> Stage {
        if got < HEADER_LEN {
            return Stage::Header { got };
        }
        let header = match Header::decode(&self.header) {
            Ok(h) => h,
            Err(e) => return Stage::Failed(e),
        };
        if header.frame_type == FrameType::Data {
            Stage::DataHead { header, got: 0 }
        } else {
            self.start_payload(header, None, header.payload_len_bytes as usize)
        }
    }

    fn after_data_head(&mut self, header: Header, got: usize) -> Stage {
        if got < DATA_HEAD_LEN {
            return Stage::DataHead { header, got };
        }
        // The header bounds guarantee payload_len_bytes > DATA_HEAD_LEN.
        let payload_len_bytes = header.payload_len_bytes.saturating_sub(DATA_HEAD_BYTES);
        match DataHead::decode(&self.data_head, payload_len_bytes) {
            Ok(head) => {
                if let Some(spare) = self.spare.take() {
                    self.body = spare;
                }
                self.start_payload(header, Some(head), payload_len_bytes as usize)
            }
            Err(e) => Stage::Failed(e),
        }
    }

    /// Sizes the body buffer; the length was bounded by the header checks.
    fn start_payload(&mut self, header: Header, data: Option<DataHead>, len: usize) -> Stage {
        if self.body.capacity() < len {
            // alloc_zeroed: pages the peer never sends are never touched.
            self.body = vec![0u8; len];
        } else if self.body.len() >= len {
            // No memset of a reused buffer: `len` bytes are read into it
            // before anything looks at it.
            self.body.truncate(len);
        } else {
            self.body.resize(len, 0);
        }
        if len == 0 {
            return self.after_payload(header, data, 0);
        }
        Stage::Payload {
            header,
            data,
            got: 0,
        }
    }

    fn after_payload(&mut self, header: Header, data: Option<DataHead>, got: usize) -> Stage {
        if got < self.body.len() {
            return Stage::Payload { header, data, got };
        }
        if let Some(head) = data {
            let payload = std::mem::take(&mut self.body);
            return Stage::Ready(Frame::Data(Data { head, payload }));
        }
        let parsed = Frame::parse(header.frame_type, &self.body);
        if self.body.capacity() > KEEP_BODY_CAPACITY_BYTES {
            self.body = Vec::new();
        }
        match parsed {
            Ok(frame) => Stage::Ready(frame),
            Err(e) => Stage::Failed(e),
        }
    }
}
