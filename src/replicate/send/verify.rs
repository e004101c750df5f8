//! The end of a send disk: DONE on every stream, then (if asked) the
//! receiver reads the target back and its digest is compared.

use super::*;

/// Ask the receiver, on `c`, to read the whole target back and compare its
/// digest with the source's (windows the receiver already held before this
/// run are read from the source first). The digest, in hex, if they match.
pub(super) fn verify_target(
    opts: &SendOptions,
    image: &Mutex<ImageDigest>,
    source: &mut Option<crate::endpoint::open::Source>,
    c: &mut Conn,
) -> Result<String, CopyError> {
    let mut img = lock(image);
    if img.missing_windows() > 0 {
        let mut src = match source.take() {
            Some(s) => s,
            None => open_source(&opts.source, opts.source_format, 1, opts.io_timeout)?,
        };
        let read = crate::replicate::source::digest_missing_windows(&mut src, &mut img)?;
        debug!(read, "digested the windows the receiver already had");
    }
    let want = img
        .finish()
        .map_err(|e| CopyError::Internal(e.to_string()))?;
    drop(img);
    let mut scratch = Vec::new();
    write_frame(
        &mut c.stream,
        &Frame::VerifyRequest {
            window_bytes: opts.chunk_bytes,
        },
        &mut scratch,
    )
    .map_err(fail_msg)?;
    c.stream.flush().map_err(|e| fail_msg(StreamError::Io(e)))?;
    // Reading a whole disk back takes a while: no stall timeout here.
    let _ = c.stream.set_read_timeout(None);
    let answer = loop {
        match read_frame(&mut c.stream, &mut c.dec).map_err(fail_msg)? {
            Frame::Ack(_) | Frame::Pong { .. } => continue,
            f => break f,
        }
    };
    match answer {
        Frame::VerifyResult { digest, bytes_read } => {
            if digest != want {
                return Err(CopyError::TargetWrite(format!(
                    "(verify): the target's digest {} differs from the source's {} after reading {bytes_read} bytes",
                    hex(&digest),
                    hex(&want)
                )));
            }
            Ok(hex(&want))
        }
        other => Err(fail_msg(unexpected(other))),
    }
}

/// Say DONE on every stream and wait for the receiver to accept it; the
/// streams stay open (for the verify pass).
pub(super) fn say_done(conns: &mut [Conn]) -> Result<(), CopyError> {
    let mut scratch = Vec::new();
    for c in conns {
        let done = Frame::Done {
            total_bytes_sent: c.payload_bytes,
            frames: c.frames,
        };
        let s = &mut c.stream;
        write_frame(s, &done, &mut scratch).map_err(fail_msg)?;
        // A PING after DONE: its PONG proves the receiver accepted DONE
        // (frames are handled in order; a refusal would be an ERROR).
        write_frame(s, &Frame::Ping { nonce: 0xD0_4E }, &mut scratch).map_err(fail_msg)?;
        s.flush().map_err(|e| fail_msg(StreamError::Io(e)))?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        loop {
            match read_frame(s, &mut c.dec) {
                Ok(Frame::Pong { .. }) | Err(StreamError::Closed) => break,
                Ok(Frame::Ack(_)) => continue,
                Ok(Frame::Error(e)) => {
                    return Err(fail_msg(format!(
                        "the receiver refused DONE: {:?}: {}",
                        e.code,
                        printable(&e.message)
                    )));
                }
                Ok(other) => return Err(fail_msg(unexpected(other))),
                Err(e) => return Err(fail_msg(format!("no answer to DONE: {e}"))),
            }
        }
    }
    Ok(())
}

pub(super) fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}
