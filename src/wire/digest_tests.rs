//! [`ImageDigestStream`] against [`ImageDigest`]: the same digest, whatever
//! the pieces, and the same refusals.

use super::digest::MAX_IMAGE_WINDOWS;
use super::*;
use proptest::prelude::*;

fn table_digest(image: &[u8], window_bytes: u32, holes: &[bool]) -> [u8; 32] {
    let mut d = ImageDigest::new(image.len() as u64, window_bytes).unwrap();
    for (i, w) in image.chunks(window_bytes as usize).enumerate() {
        if holes[i] {
            d.zero_window(i as u64).unwrap();
        } else {
            d.hash_window(i as u64, w).unwrap();
        }
    }
    d.finish().unwrap()
}

proptest! {
    #[test]
    fn stream_matches_the_table_digest(
        size in 0usize..40_000,
        window_kib in 4u32..12,
        piece_bytes in 1usize..9000,
        seed in any::<u64>(),
        hole_mask in any::<u64>(),
    ) {
        let window_bytes = window_kib * 1024;
        let mut x = seed | 1;
        let mut image: Vec<u8> = (0..size).map(|_| { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x.to_le_bytes()[0] }).collect();
        let windows = size.div_ceil(window_bytes as usize);
        // A window marked as a hole is zeros in the image too.
        let holes: Vec<bool> = (0..windows).map(|i| hole_mask >> (i % 64) & 1 == 1).collect();
        for (i, w) in image.chunks_mut(window_bytes as usize).enumerate() {
            if holes[i] {
                w.fill(0);
            }
        }
        let mut s = ImageDigestStream::new(size as u64, window_bytes).unwrap();
        let mut index = 0usize;
        while let Some((offset, len)) = s.next_window() {
            prop_assert_eq!(offset, (index * window_bytes as usize) as u64);
            if holes[index] {
                s.zero_window().unwrap();
            } else {
                let start = usize::try_from(offset).unwrap();
                let w = &image[start..start + len as usize];
                for piece in w.chunks(piece_bytes) {
                    s.update(piece).unwrap();
                }
                s.end_window().unwrap();
            }
            index += 1;
        }
        prop_assert_eq!(index, windows);
        prop_assert_eq!(s.finish().unwrap(), table_digest(&image, window_bytes, &holes));
    }
}

#[test]
fn stream_refuses_bad_geometry_and_wrong_lengths() {
    assert!(
        ImageDigestStream::new(1 << 40, 100).is_err(),
        "window too small"
    );
    assert!(
        ImageDigestStream::new(1 << 40, 64 << 20).is_err(),
        "window too large"
    );
    let too_many = (MAX_IMAGE_WINDOWS + 1) * 4096;
    assert!(
        ImageDigestStream::new(too_many, 4096).is_err(),
        "too many windows"
    );

    let mut s = ImageDigestStream::new(10_000, 4096).unwrap();
    assert!(matches!(
        s.finish(),
        Err(WireError::WindowMissing { index: 0 })
    ));
    s.update(&[1; 4000]).unwrap();
    assert!(
        matches!(
            s.end_window(),
            Err(WireError::WindowLength {
                index: 0,
                want_bytes: 4096,
                got_bytes: 4000
            })
        ),
        "a short window"
    );
    assert!(s.update(&[1; 97]).is_err(), "more than the window");
    assert!(s.zero_window().is_err(), "a hole after bytes were fed");
    s.update(&[1; 96]).unwrap();
    s.end_window().unwrap();
    s.zero_window().unwrap();
    assert_eq!(s.next_window(), Some((8192, 10_000 - 8192)));
    s.update(&[0; 10_000 - 8192]).unwrap();
    s.end_window().unwrap();
    assert_eq!(s.next_window(), None);
    assert!(s.update(&[0]).is_err() && s.end_window().is_err() && s.zero_window().is_err());
    s.finish().unwrap();

    let empty = ImageDigestStream::new(0, 4096).unwrap();
    assert_eq!(
        empty.finish().unwrap(),
        ImageDigest::new(0, 4096).unwrap().finish().unwrap()
    );
}
