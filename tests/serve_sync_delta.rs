//! Delta passes through a real `diskferry serve` process (protocol v2):
//! the target is opened as it is and never truncated (a shorter file is
//! extended, a longer one refused before anything is journaled or
//! written), a delta completes like a full pass and records its sync,
//! which an incremental can then build on. (The DIGEST_REQUEST read-back
//! is the delta helper's; here the pass sends every block.)

#[path = "support/rx.rs"]
mod rx;
mod serve_support;
mod sync_support;

use diskferry::wire::{Codec, ErrorCode, Frame, PassMode};
use sync_support::*;

const D1: [u8; 16] = [0xd1; 16];
const S2: [u8; 16] = [0x22; 16];

fn delta_hello(job: u8, target: &str) -> diskferry::wire::Hello {
    pass_hello(job, target, PassMode::Delta, D1)
}

#[test]
fn a_delta_onto_a_longer_file_is_refused_and_leaves_no_journal() {
    let dir = tempfile::tempdir().unwrap();
    let rx = rx::Rx::start(dir.path(), &[]);
    let long = serve_support::random_bytes((SIZE + 4096) as usize, 3);
    std::fs::write(rx.target("long.img"), &long).unwrap();
    let mut c = connect(&rx);
    let reply = c.hello(&delta_hello(1, "long.img"));
    let Frame::Error(e) = reply else {
        panic!("expected a refusal, got {reply:?}");
    };
    assert_eq!(e.code, ErrorCode::TargetNotAllowed, "{}", e.message);
    assert!(e.message.contains("never truncates"), "{}", e.message);
    assert_names_no_path(&rx, &e.message);
    assert_eq!(
        std::fs::read(rx.target("long.img")).unwrap(),
        long,
        "untouched"
    );
    assert!(
        journal(&rx, "long.img").is_none(),
        "a refused delta must not make the file look like ours"
    );
}

#[test]
fn a_delta_onto_a_shorter_file_extends_it_keeps_its_bytes_and_completes() {
    let dir = tempfile::tempdir().unwrap();
    let rx = rx::Rx::start(dir.path(), &[]);
    let source = serve_support::random_bytes(SIZE as usize, 4);
    // Filled by another tool: the first MiB already matches, no journal.
    std::fs::write(rx.target(TARGET), &source[..MIB as usize]).unwrap();
    let mut c = connect(&rx);
    let w = match c.hello(&delta_hello(1, TARGET)) {
        Frame::Welcome(w) => w,
        other => panic!("expected WELCOME, got {other:?}"),
    };
    assert_eq!(w.sync_id, D1);
    assert!(w.durable.is_empty() && w.replan.is_empty());
    let j = journal(&rx, TARGET).expect("the pass is journaled first");
    assert!(j.pass_mode == PassMode::Delta && !j.complete && j.last_sync_id.is_none());
    let now = std::fs::read(rx.target(TARGET)).unwrap();
    assert_eq!(now.len() as u64, SIZE, "extended to the source's size");
    assert_eq!(&now[..MIB as usize], &source[..MIB as usize], "kept");
    assert!(now[MIB as usize..].iter().all(|&b| b == 0));

    // A delta pass completes when every byte is durable. Without the
    // DIGEST_REQUEST read-back (which would let the matching first MiB
    // count), this test sends every block.
    let chunks: Vec<_> = (1..SIZE / MIB)
        .chain([0])
        .map(|i| range(i * MIB, MIB))
        .collect();
    send_ranges(&mut c, &source, &chunks);
    c.barrier(1);
    c.done();
    drop(c);
    wait_for_journal(&rx, |j| j.complete);
    assert_eq!(std::fs::read(rx.target(TARGET)).unwrap(), source);
    let j = journal(&rx, TARGET).unwrap();
    assert_eq!(j.last_sync_id, Some(D1));
    assert_eq!(j.pass_mode, PassMode::Delta);

    // An incremental builds on the delta's sync.
    let plan = [range(0, 4096)];
    let new = changed(&source, &plan, 9);
    let mut c = connect(&rx);
    let w = welcome_incremental(&mut c, &incremental_hello(2, S2, D1, &plan), &plan);
    assert_eq!(w.sync_id, S2);
    send_ranges(&mut c, &new, &plan);
    c.barrier(1);
    c.done();
    drop(c);
    wait_for_journal(&rx, |j| j.last_sync_id == Some(S2));
    assert_eq!(std::fs::read(rx.target(TARGET)).unwrap(), new);
}

#[test]
fn an_interrupted_delta_resumes_only_for_the_same_source() {
    let dir = tempfile::tempdir().unwrap();
    let rx = rx::Rx::start(dir.path(), &[]);
    let source = serve_support::random_bytes(SIZE as usize, 5);
    let mut c = connect(&rx);
    assert!(matches!(
        c.hello(&delta_hello(1, TARGET)),
        Frame::Welcome(_)
    ));
    c.data(0, &source[..MIB as usize], Codec::None);
    c.barrier(1);
    drop(c);
    wait_for_journal(&rx, |j| j.durable.contains(0, MIB));

    let mut c = connect(&rx);
    let rerun = diskferry::wire::Hello {
        source_identity: "source-after-1".into(),
        ..delta_hello(2, TARGET)
    };
    let Frame::Welcome(w) = c.hello(&rerun) else {
        panic!("expected WELCOME");
    };
    assert_eq!(w.durable, vec![range(0, MIB)], "the same source resumes");
    drop(c);
    wait_for_journal(&rx, |j| j.job_id == [2; 16]);

    let mut c = connect(&rx);
    let Frame::Welcome(w) = c.hello(&delta_hello(3, TARGET)) else {
        panic!("expected WELCOME");
    };
    assert!(w.durable.is_empty(), "another source starts over: {w:?}");
    // Never truncated: what the interrupted pass wrote is still there.
    let now = std::fs::read(rx.target(TARGET)).unwrap();
    assert_eq!(&now[..MIB as usize], &source[..MIB as usize]);
}

#[test]
fn digest_request_on_a_full_pass_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rx = rx::Rx::start(dir.path(), &[]);
    let mut c = connect(&rx);
    let full = pass_hello(1, TARGET, PassMode::Full, D1);
    assert!(matches!(c.hello(&full), Frame::Welcome(_)));
    c.send(&Frame::DigestRequest {
        offset: 0,
        len_bytes: 65536,
        block_bytes: 65536,
    });
    let (code, message) = c.expect_error();
    assert_eq!(code, ErrorCode::Protocol, "{message}");
    assert!(message.contains("delta"), "{message}");
}
