//! Round trips and bounds of the protocol codecs.

use super::*;
use crate::nbd::MAX_PAYLOAD_BYTES;
use proptest::prelude::*;

proptest! {
    #[test]
    fn request_round_trip(flags: u16, cmd_type: u16, cookie: u64, offset: u64, len_bytes: u32) {
        let h = RequestHeader { flags, cmd_type, cookie, offset, len_bytes };
        let mut out = [0u8; REQUEST_BYTES];
        encode_request_header(&h, &mut out);
        prop_assert_eq!(decode_request_header(&out).unwrap(), h);
    }

    #[test]
    fn chunk_header_round_trip(flags: u16, reply_type: u16, cookie: u64, len_bytes in 0u32..=MAX_PAYLOAD_BYTES) {
        let h = ChunkHeader { flags, reply_type, cookie, len_bytes };
        prop_assert_eq!(decode_chunk_header(&encode_chunk_header(&h)).unwrap(), h);
    }

    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = decode_info(&bytes);
        let _ = decode_meta_context(&bytes);
        if bytes.len() >= 20 {
            let a: [u8; 20] = bytes[..20].try_into().unwrap();
            let _ = decode_opt_reply_header(&a, OPT_GO);
            let _ = decode_chunk_header(&a);
            let g: [u8; 18] = bytes[..18].try_into().unwrap();
            let _ = decode_greeting(&g);
        }
    }

    #[test]
    fn opt_reply_length_is_bounded(len in (MAX_OPT_ERROR_REPLY_BYTES + 1)..=u32::MAX, ty: u32) {
        let mut b = [0u8; 20];
        b[0..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        b[12..16].copy_from_slice(&ty.to_be_bytes());
        b[16..20].copy_from_slice(&len.to_be_bytes());
        prop_assert!(decode_opt_reply_header(&b, OPT_GO).is_err());
    }
}

#[test]
fn huge_chunk_is_refused_before_allocation() {
    let h = ChunkHeader {
        flags: 0,
        reply_type: REPLY_TYPE_BLOCK_STATUS,
        cookie: 7,
        len_bytes: u32::MAX,
    };
    let err = decode_chunk_header(&encode_chunk_header(&h)).unwrap_err();
    assert!(err.to_string().contains("4294967295 bytes"), "{err}");
}

#[test]
fn block_size_info_is_checked() {
    let mut b = vec![0, 3];
    for v in [512u32, 4096, 1 << 20] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    assert_eq!(
        decode_info(&b).unwrap(),
        Info::BlockSize {
            min_bytes: 512,
            pref_bytes: 4096,
            max_bytes: 1 << 20
        }
    );
    b[2..6].copy_from_slice(&3u32.to_be_bytes());
    assert!(
        decode_info(&b)
            .unwrap_err()
            .to_string()
            .contains("power of two")
    );
}

#[test]
fn greeting_magics() {
    let mut g = [0u8; 18];
    g[0..8].copy_from_slice(&INIT_MAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&OPTS_MAGIC.to_be_bytes());
    g[17] = 3;
    assert_eq!(decode_greeting(&g).unwrap(), 3);
    g[0] = b'X';
    assert!(
        decode_greeting(&g)
            .unwrap_err()
            .to_string()
            .contains("NBDMAGIC")
    );
}
