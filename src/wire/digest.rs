//! Chunk digests and the whole-image digest used by the verify pass.
//!
//! The image is cut into fixed windows (`window_bytes`, the last one may be
//! short). Each window's digest is BLAKE3 of its bytes. The image digest is
//! BLAKE3 in key-derivation mode with context [`IMAGE_DIGEST_CONTEXT`] over
//! `size_bytes (u64 LE) ‖ window_bytes (u32 LE) ‖ d0 ‖ d1 ‖ …` — so the two
//! sides agree whatever order windows were read in, and a different window
//! size or image size never collides with the same bytes cut differently.

use super::{MAX_CHUNK_BYTES, WireError};

/// BLAKE3 key-derivation context of the image digest.
pub const IMAGE_DIGEST_CONTEXT: &str = "diskferry 2024 image digest v1";
/// Smallest window the image digest accepts.
pub const MIN_WINDOW_BYTES: u32 = 4096;
/// Most windows one image digest tracks (32 bytes each: 1 GiB at most).
pub const MAX_IMAGE_WINDOWS: u64 = 1 << 25;

/// BLAKE3 of a chunk's raw bytes (the digest carried by DATA frames).
pub fn chunk_digest(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
}

/// Which digest DATA frames carry (negotiated: [`super::Features::XXH3`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChunkDigest {
    /// BLAKE3 (32 bytes); the default.
    #[default]
    Blake3,
    /// XXH3-128, little endian, in the first 16 of the 32 bytes.
    Xxh3,
}

/// A chunk digest taken piece by piece, as bytes arrive (the receiver
/// hashes each read while it is still in cache). Only XXH3 streams here;
/// BLAKE3 chunks are hashed whole.
pub struct StreamingChunkDigest {
    state: twox_hash::XxHash3_128,
    bytes: usize,
}

impl Default for StreamingChunkDigest {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamingChunkDigest {
    /// A digest of no bytes yet.
    pub fn new() -> Self {
        Self {
            state: twox_hash::XxHash3_128::new(),
            bytes: 0,
        }
    }

    /// Start over for a new chunk.
    pub fn reset(&mut self) {
        self.state = twox_hash::XxHash3_128::new();
        self.bytes = 0;
    }

    /// Feeds the next bytes of the chunk.
    pub fn update(&mut self, bytes: &[u8]) {
        self.state.write(bytes);
        self.bytes += bytes.len();
    }

    /// Bytes hashed since the last reset.
    pub fn len_bytes(&self) -> usize {
        self.bytes
    }

    /// The digest of everything since the last reset, laid out as
    /// [`ChunkDigest::Xxh3`] lays it out.
    pub fn finish(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out[..16].copy_from_slice(&self.state.finish_128().to_le_bytes());
        out
    }
}

impl ChunkDigest {
    /// The kind a stream with these accepted features uses.
    pub fn for_features(f: super::Features) -> Self {
        if f.contains(super::Features::XXH3) {
            ChunkDigest::Xxh3
        } else {
            ChunkDigest::Blake3
        }
    }

    /// The 32-byte `raw_digest` of `bytes`.
    pub fn digest(self, bytes: &[u8]) -> [u8; 32] {
        match self {
            ChunkDigest::Blake3 => chunk_digest(bytes),
            ChunkDigest::Xxh3 => {
                let mut out = [0u8; 32];
                out[..16].copy_from_slice(&twox_hash::XxHash3_128::oneshot(bytes).to_le_bytes());
                out
            }
        }
    }

    /// The digest's name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            ChunkDigest::Blake3 => "BLAKE3",
            ChunkDigest::Xxh3 => "XXH3-128",
        }
    }
}

/// Digest of `len_bytes` zero bytes, without allocating them.
fn zeros_digest(len_bytes: u64) -> [u8; 32] {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut hasher = blake3::Hasher::new();
    let mut left = len_bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(ZEROS.len(), |l| l.min(ZEROS.len()));
        hasher.update(&ZEROS[..n]);
        left -= n as u64;
    }
    *hasher.finalize().as_bytes()
}

/// Length of a window that starts `rest_bytes` before the end of the
/// image: a whole window, or the short last one.
fn window_len(rest_bytes: u64, window_bytes: u32) -> u32 {
    u32::try_from(rest_bytes).map_or(window_bytes, |rest| rest.min(window_bytes))
}

/// The number of windows of an image digest, once its geometry is known
/// to be usable (windows of 4 KiB ..= 32 MiB, at most [`MAX_IMAGE_WINDOWS`]).
fn check_geometry(size_bytes: u64, window_bytes: u32) -> Result<u64, WireError> {
    let geometry = |why| WireError::DigestGeometry {
        size_bytes,
        window_bytes,
        why,
    };
    if !(MIN_WINDOW_BYTES..=MAX_CHUNK_BYTES).contains(&window_bytes) {
        return Err(geometry("the window must be 4 KiB ..= 32 MiB"));
    }
    let windows = size_bytes.div_ceil(u64::from(window_bytes));
    if windows > MAX_IMAGE_WINDOWS {
        return Err(geometry("too many windows: use a larger window"));
    }
    Ok(windows)
}

/// Whole-image digest accumulated from per-window digests in any order.
/// Memory: 32 bytes (plus one bit) per window.
#[derive(Debug, Clone)]
pub struct ImageDigest {
    size_bytes: u64,
    window_bytes: u32,
    windows: u64,
    digests: Vec<[u8; 32]>,
    present: Vec<u64>,
    zero_full: Option<[u8; 32]>,
    zero_tail: Option<[u8; 32]>,
}

impl ImageDigest {
    /// A digest of an image of `size_bytes` cut in `window_bytes` windows
    /// (4 KiB ..= 32 MiB; at most [`MAX_IMAGE_WINDOWS`] windows).
    pub fn new(size_bytes: u64, window_bytes: u32) -> Result<Self, WireError> {
        let windows = check_geometry(size_bytes, window_bytes)?;
        let count = usize::try_from(windows).map_err(|_| WireError::DigestGeometry {
            size_bytes,
            window_bytes,
            why: "too many windows for this host: use a larger window",
        })?;
        Ok(ImageDigest {
            size_bytes,
            window_bytes,
            windows,
            digests: vec![[0u8; 32]; count],
            present: vec![0u64; count.div_ceil(64)],
            zero_full: None,
            zero_tail: None,
        })
    }

    /// Number of windows.
    pub fn windows(&self) -> u64 {
        self.windows
    }

    /// Image size this digest covers.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Window size.
    pub fn window_bytes(&self) -> u32 {
        self.window_bytes
    }

    /// Length of window `index` (the last one may be short).
    pub fn window_len_bytes(&self, index: u64) -> Result<u32, WireError> {
        self.check_index(index)?;
        let start = index * u64::from(self.window_bytes);
        Ok(window_len(self.size_bytes - start, self.window_bytes))
    }

    /// Records the BLAKE3 digest of window `index`'s bytes.
    pub fn set_window(&mut self, index: u64, digest: [u8; 32]) -> Result<(), WireError> {
        let i = self.check_index(index)?;
        self.digests[i] = digest;
        self.present[i / 64] |= 1 << (i % 64);
        Ok(())
    }

    /// Hashes window `index` from its bytes (which must be exactly the
    /// window's length).
    pub fn hash_window(&mut self, index: u64, bytes: &[u8]) -> Result<(), WireError> {
        let want_bytes = self.window_len_bytes(index)?;
        if bytes.len() != want_bytes as usize {
            return Err(WireError::WindowLength {
                index,
                want_bytes,
                got_bytes: bytes.len(),
            });
        }
        self.set_window(index, chunk_digest(bytes))
    }

    /// Records that window `index` is entirely zero (a hole): its digest
    /// is that of zero bytes of the window's length, computed once.
    pub fn zero_window(&mut self, index: u64) -> Result<(), WireError> {
        let len = self.window_len_bytes(index)?;
        let cache = if len == self.window_bytes {
            &mut self.zero_full
        } else {
            &mut self.zero_tail
        };
        let digest = *cache.get_or_insert_with(|| zeros_digest(u64::from(len)));
        self.set_window(index, digest)
    }

    /// Whether window `index` was supplied.
    pub fn has_window(&self, index: u64) -> bool {
        let Ok(i) = usize::try_from(index) else {
            return false;
        };
        index < self.windows && self.present[i / 64] & (1 << (i % 64)) != 0
    }

    /// Windows not supplied yet.
    pub fn missing_windows(&self) -> u64 {
        let present: u64 = self.present.iter().map(|w| u64::from(w.count_ones())).sum();
        self.windows - present
    }

    /// The image digest; fails naming the first window never supplied.
    pub fn finish(&self) -> Result<[u8; 32], WireError> {
        let mut hasher = blake3::Hasher::new_derive_key(IMAGE_DIGEST_CONTEXT);
        hasher.update(&self.size_bytes.to_le_bytes());
        hasher.update(&self.window_bytes.to_le_bytes());
        for (i, digest) in self.digests.iter().enumerate() {
            if self.present[i / 64] & (1 << (i % 64)) == 0 {
                return Err(WireError::WindowMissing { index: i as u64 });
            }
            hasher.update(digest);
        }
        Ok(*hasher.finalize().as_bytes())
    }

    /// `index` as a position in the window tables, if it names a window.
    fn check_index(&self, index: u64) -> Result<usize, WireError> {
        let out_of_range = WireError::WindowOutOfRange {
            index,
            windows: self.windows,
        };
        if index >= self.windows {
            return Err(out_of_range);
        }
        usize::try_from(index).map_err(|_| out_of_range)
    }
}

/// The same image digest as [`ImageDigest`], taken front to back in
/// constant memory: the bytes of each window are fed in pieces of any
/// size, in order. The receiver's verify pass uses it, so a peer's
/// `window_bytes` never sizes an allocation there.
#[derive(Debug, Clone)]
pub struct ImageDigestStream {
    size_bytes: u64,
    window_bytes: u32,
    windows: u64,
    /// The window being fed.
    index: u64,
    /// BLAKE3 of the current window's bytes so far, and how many.
    window: blake3::Hasher,
    window_fed_bytes: u64,
    image: blake3::Hasher,
    zero_full: Option<[u8; 32]>,
}

impl ImageDigestStream {
    /// As [`ImageDigest::new`] (same bounds), without the per-window table.
    pub fn new(size_bytes: u64, window_bytes: u32) -> Result<Self, WireError> {
        let windows = check_geometry(size_bytes, window_bytes)?;
        let mut image = blake3::Hasher::new_derive_key(IMAGE_DIGEST_CONTEXT);
        image.update(&size_bytes.to_le_bytes());
        image.update(&window_bytes.to_le_bytes());
        Ok(ImageDigestStream {
            size_bytes,
            window_bytes,
            windows,
            index: 0,
            window: blake3::Hasher::new(),
            window_fed_bytes: 0,
            image,
            zero_full: None,
        })
    }

    /// The window to feed next, as `(offset, len_bytes)`; `None` once
    /// every window is in.
    pub fn next_window(&self) -> Option<(u64, u32)> {
        if self.index >= self.windows {
            return None;
        }
        let offset = self.index * u64::from(self.window_bytes);
        Some((
            offset,
            window_len(self.size_bytes - offset, self.window_bytes),
        ))
    }

    fn current(&self) -> Result<u32, WireError> {
        self.next_window()
            .map(|(_, len)| len)
            .ok_or(WireError::WindowOutOfRange {
                index: self.index,
                windows: self.windows,
            })
    }

    /// Feeds the next bytes of the current window.
    pub fn update(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        let want_bytes = self.current()?;
        let fed = self.window_fed_bytes + bytes.len() as u64;
        if fed > u64::from(want_bytes) {
            return Err(WireError::WindowLength {
                index: self.index,
                want_bytes,
                got_bytes: usize::try_from(fed).unwrap_or(usize::MAX),
            });
        }
        self.window.update(bytes);
        self.window_fed_bytes = fed;
        Ok(())
    }

    /// Ends the current window, which must have been fed exactly its length.
    pub fn end_window(&mut self) -> Result<(), WireError> {
        let want_bytes = self.current()?;
        if self.window_fed_bytes != u64::from(want_bytes) {
            return Err(WireError::WindowLength {
                index: self.index,
                want_bytes,
                got_bytes: usize::try_from(self.window_fed_bytes).unwrap_or(usize::MAX),
            });
        }
        let digest = *self.window.finalize().as_bytes();
        self.push(digest);
        Ok(())
    }

    /// The current window (nothing fed of it) is entirely zero: a hole.
    pub fn zero_window(&mut self) -> Result<(), WireError> {
        let len = self.current()?;
        if self.window_fed_bytes != 0 {
            return Err(WireError::WindowLength {
                index: self.index,
                want_bytes: len,
                got_bytes: usize::try_from(self.window_fed_bytes).unwrap_or(usize::MAX),
            });
        }
        let digest = if len == self.window_bytes {
            *self
                .zero_full
                .get_or_insert_with(|| zeros_digest(u64::from(len)))
        } else {
            zeros_digest(u64::from(len))
        };
        self.push(digest);
        Ok(())
    }

    fn push(&mut self, digest: [u8; 32]) {
        self.image.update(&digest);
        self.window.reset();
        self.window_fed_bytes = 0;
        self.index += 1;
    }

    /// The image digest; fails naming the first window not ended.
    pub fn finish(&self) -> Result<[u8; 32], WireError> {
        if self.index < self.windows {
            return Err(WireError::WindowMissing { index: self.index });
        }
        Ok(*self.image.finalize().as_bytes())
    }
}
