//! Incremental passes through a real `diskferry serve` process (protocol
//! v2): the base must be the target's last complete sync, the PLAN must
//! match the HELLO's digest and stay bounded, an interrupted pass resumes
//! or widens to the union of both plans, and completion records the new
//! sync. Every refusal leaves the target and its journal as they were.

#[path = "support/rx.rs"]
mod rx;
mod serve_support;
mod sync_support;

use diskferry::wire::{ErrorCode, Frame, HEADER_LEN, MAGIC, PROTOCOL_VERSION, PassMode};
use sync_support::*;

const S2: [u8; 16] = [0x22; 16];
const S3: [u8; 16] = [0x33; 16];
const WRONG: [u8; 16] = [0x0e; 16];

/// The base sync sent on each I/O engine.
#[test]
fn an_incremental_on_its_base_writes_only_its_plan_and_records_the_new_sync() {
    for engine in ["uring", "threads"] {
        let dir = tempfile::tempdir().unwrap();
        incremental_on_its_base(dir.path(), engine);
    }
}

fn incremental_on_its_base(dir: &std::path::Path, engine: &str) {
    let (rx, base, s1) = synced_with(dir, engine);
    let plan = [
        range(0, 64 << 10),
        range(MIB, 4096),
        range(SIZE - 4096, 4096),
    ];
    let new = changed(&base, &plan, 7);
    let mut c = connect(&rx);
    let w = welcome_incremental(&mut c, &incremental_hello(2, S2, s1, &plan), &plan);
    assert_eq!(w.sync_id, S2, "the id the target records on completion");
    assert!(w.durable.is_empty() && w.replan.is_empty(), "{w:?}");
    let j = journal(&rx, TARGET).unwrap();
    assert!(
        !j.complete && j.pass_mode == PassMode::Incremental,
        "journaled first: {j:?}"
    );
    assert_eq!(j.base_sync_id, Some(s1));
    assert_eq!(j.planned.covered_bytes(), (64 << 10) + 8192);

    send_ranges(&mut c, &new, &plan);
    c.barrier(1);
    c.done();
    drop(c);
    wait_for_journal(&rx, |j| j.complete);
    assert_eq!(std::fs::read(rx.target(TARGET)).unwrap(), new);
    let j = journal(&rx, TARGET).unwrap();
    assert_eq!(j.last_sync_id, Some(S2));
    assert_eq!(j.change_id, "CHG-2");
    assert_eq!(j.source_identity, "source-after-2");
    assert!(j.planned.is_empty() && j.base_sync_id.is_none());
    let stamp = j.target_stamp.expect("a regular file's stamp is recorded");
    assert_eq!(stamp.size_bytes, SIZE);

    // The sender reconnecting with the same HELLO (its answer to DONE
    // lost): already complete, the same id.
    let mut again = connect(&rx);
    let w = welcome_incremental(&mut again, &incremental_hello(2, S2, s1, &plan), &plan);
    assert_eq!(w.sync_id, S2);
    assert_eq!(w.durable, vec![range(0, SIZE)]);
    drop(again);

    // The old base is no longer the last sync.
    let mut again = connect(&rx);
    let plan2 = [range(0, 4096)];
    again.send(&Frame::Hello(incremental_hello(3, S3, s1, &plan2)));
    again.send(&Frame::Plan(plan2.to_vec()));
    let (code, message) = again.expect_error();
    assert_eq!(code, ErrorCode::BaseMismatch);
    assert!(
        message.contains(&hex(&S2)),
        "names the last sync: {message}"
    );
}

#[test]
fn a_wrong_base_is_refused_naming_the_last_sync_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (rx, _base, s1) = synced(dir.path());
    let before = checksum(&rx.target(TARGET));
    let journal_before = journal(&rx, TARGET);
    let plan = [range(0, 4096)];
    let mut c = connect(&rx);
    c.send(&Frame::Hello(incremental_hello(2, S2, WRONG, &plan)));
    c.send(&Frame::Plan(plan.to_vec()));
    let (code, message) = c.expect_error();
    assert_eq!(code, ErrorCode::BaseMismatch, "{message}");
    assert!(
        message.contains(&hex(&s1)),
        "names the target's last sync: {message}"
    );
    assert!(
        message.contains("--delta"),
        "suggests a delta pass: {message}"
    );
    assert!(message.contains(TARGET), "{message}");
    assert_names_no_path(&rx, &message);
    assert_eq!(checksum(&rx.target(TARGET)), before, "target untouched");
    assert_eq!(journal(&rx, TARGET), journal_before, "journal untouched");

    // No journal at all: refused before the target is even created.
    let mut c = connect(&rx);
    let hello = diskferry::wire::Hello {
        target: "new.img".into(),
        ..incremental_hello(4, S3, s1, &plan)
    };
    let reply = open_incremental(&mut c, &hello, &plan);
    assert!(
        matches!(&reply, Frame::Error(e) if e.code == ErrorCode::BaseMismatch),
        "{reply:?}"
    );
    assert!(
        !rx.target("new.img").exists(),
        "a refused pass creates nothing"
    );
}

#[test]
fn a_target_changed_since_its_sync_is_a_base_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let (rx, _base, s1) = synced(dir.path());
    // Someone writes to the target behind the receiver's back.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut bytes = std::fs::read(rx.target(TARGET)).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(rx.target(TARGET), &bytes).unwrap();
    let before = checksum(&rx.target(TARGET));
    let plan = [range(0, 4096)];
    let mut c = connect(&rx);
    c.send(&Frame::Hello(incremental_hello(2, S2, s1, &plan)));
    c.send(&Frame::Plan(plan.to_vec()));
    let (code, message) = c.expect_error();
    assert_eq!(code, ErrorCode::BaseMismatch, "{message}");
    assert!(message.contains("changed since"), "{message}");
    assert_eq!(checksum(&rx.target(TARGET)), before, "target untouched");
}

#[test]
fn a_plan_that_does_not_match_its_digest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (rx, _base, s1) = synced(dir.path());
    let before = checksum(&rx.target(TARGET));
    let journal_before = journal(&rx, TARGET);
    let announced = [range(0, 4096)];
    let sent = [range(0, 8192)];
    let mut c = connect(&rx);
    c.send(&Frame::Hello(incremental_hello(2, S2, s1, &announced)));
    c.send(&Frame::Plan(sent.to_vec()));
    let (code, message) = c.expect_error();
    assert_eq!(code, ErrorCode::Protocol, "{message}");
    assert!(message.contains("plan digest"), "{message}");
    assert_eq!(checksum(&rx.target(TARGET)), before);
    assert_eq!(journal(&rx, TARGET), journal_before);
}

#[test]
fn a_plan_too_large_is_refused_from_its_header() {
    let dir = tempfile::tempdir().unwrap();
    let (rx, _base, s1) = synced(dir.path());
    let journal_before = journal(&rx, TARGET);
    let mut c = connect(&rx);
    c.send(&Frame::Hello(incremental_hello(2, S2, s1, &[])));
    // A header claiming one range more than 2^20; no payload follows: the
    // refusal comes before the receiver waits for (or allocates) it.
    let mut header = MAGIC.to_vec();
    header.extend_from_slice(&[PROTOCOL_VERSION, 13, 0, 0]);
    header.extend_from_slice(&(4u32 + 16 * ((1 << 20) + 1)).to_le_bytes());
    assert_eq!(header.len(), HEADER_LEN);
    c.send_raw(&header);
    let (code, message) = c.expect_error();
    assert_eq!(code, ErrorCode::Protocol, "{message}");
    assert!(
        message.contains("PLAN") && message.contains("before allocating"),
        "{message}"
    );
    assert_eq!(journal(&rx, TARGET), journal_before);
}

#[test]
fn an_interrupted_pass_resumes_with_its_plan_and_widens_with_another() {
    let dir = tempfile::tempdir().unwrap();
    let (rx, base, s1) = synced(dir.path());
    let p1 = [range(0, 64 << 10), range(MIB, 64 << 10)];
    let first = changed(&base, &p1, 11);
    let mut c = connect(&rx);
    welcome_incremental(&mut c, &incremental_hello(2, S2, s1, &p1), &p1);
    send_ranges(&mut c, &first, &p1[..1]);
    assert_eq!(c.barrier(1).durable_added, vec![p1[0]]);
    drop(c); // interrupted: the receiver journals what is durable
    wait_for_journal(&rx, |j| j.durable.contains(0, 64 << 10));

    // The same plan of the same source (a rerun: another job id) resumes.
    let rerun = diskferry::wire::Hello {
        source_identity: "source-after-2".into(),
        ..incremental_hello(3, S2, s1, &p1)
    };
    let mut c = connect(&rx);
    let w = welcome_incremental(&mut c, &rerun, &p1);
    assert_eq!(w.durable, vec![p1[0]], "resumed");
    assert!(w.replan.is_empty());
    drop(c);
    wait_for_journal(&rx, |j| j.job_id == [3; 16] && !j.complete);

    // The same plan of another source state resends everything.
    let mut c = connect(&rx);
    let w = welcome_incremental(&mut c, &incremental_hello(5, S2, s1, &p1), &p1);
    assert!(w.durable.is_empty(), "{w:?}");
    drop(c);
    wait_for_journal(&rx, |j| j.job_id == [5; 16] && !j.complete);

    // Another plan on the same base: the union is planned, nothing counts
    // as durable, and what only the old plan named is to be sent again.
    let p2 = [range(MIB, 64 << 10), range(2 * MIB, 4096)];
    let source = changed(&base, &p2, 13);
    let mut c = connect(&rx);
    let w = welcome_incremental(&mut c, &incremental_hello(4, S3, s1, &p2), &p2);
    assert_eq!(w.sync_id, S3);
    assert!(w.durable.is_empty(), "{w:?}");
    assert_eq!(w.replan, vec![p1[0]], "old minus new");
    let j = journal(&rx, TARGET).unwrap();
    assert_eq!(
        j.planned.covered_bytes(),
        2 * (64 << 10) + 4096,
        "old ∪ new"
    );

    // The sender sends its plan and the replan: complete, and equal to
    // the new source (the interrupted pass's bytes are overwritten).
    send_ranges(&mut c, &source, &p2);
    send_ranges(&mut c, &source, &w.replan);
    c.barrier(1);
    c.done();
    drop(c);
    wait_for_journal(&rx, |j| j.complete);
    assert_eq!(std::fs::read(rx.target(TARGET)).unwrap(), source);
    assert_eq!(journal(&rx, TARGET).unwrap().last_sync_id, Some(S3));
}

#[test]
fn a_write_outside_the_planned_ranges_is_refused_and_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let (rx, base, s1) = synced(dir.path());
    let plan = [range(0, 4096)];
    let mut c = connect(&rx);
    welcome_incremental(&mut c, &incremental_hello(2, S2, s1, &plan), &plan);
    c.data(3 * MIB, &[1; 4096], diskferry::wire::Codec::None);
    let (code, message) = c.expect_error();
    assert_eq!(code, ErrorCode::BadRequest, "{message}");
    assert!(message.contains("planned"), "{message}");
    let now = std::fs::read(rx.target(TARGET)).unwrap();
    assert_eq!(
        &now[3 * MIB as usize..][..4096],
        &base[3 * MIB as usize..][..4096]
    );
}

#[test]
fn done_before_every_planned_range_is_durable_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (rx, base, s1) = synced(dir.path());
    let plan = [range(0, 4096), range(MIB, 4096)];
    let new = changed(&base, &plan, 5);
    let mut c = connect(&rx);
    welcome_incremental(&mut c, &incremental_hello(2, S2, s1, &plan), &plan);
    send_ranges(&mut c, &new, &plan[..1]);
    c.barrier(1);
    let frames = c.frames;
    c.send(&Frame::Done {
        total_bytes_sent: c.payload_bytes,
        frames,
    });
    let (code, message) = c.expect_error();
    assert_eq!(code, ErrorCode::Protocol, "{message}");
    assert!(message.contains("planned"), "{message}");
    let j = journal(&rx, TARGET).unwrap();
    assert!(
        !j.complete && j.last_sync_id == Some(s1),
        "not complete: {j:?}"
    );
}

#[test]
fn a_v1_hello_gets_a_version_error() {
    let dir = tempfile::tempdir().unwrap();
    let rx = rx::Rx::start(dir.path(), &[]);
    let mut payload = vec![3u8; 16];
    payload.extend_from_slice(&MIB.to_le_bytes());
    payload.extend_from_slice(&(1u32 << 20).to_le_bytes());
    payload.extend_from_slice(&0b100u32.to_le_bytes());
    payload.extend_from_slice(&0u16.to_le_bytes());
    payload.extend_from_slice(&1u16.to_le_bytes());
    payload.extend_from_slice(&0u32.to_le_bytes());
    for s in ["v1.img", "src"] {
        payload.extend_from_slice(&(s.len() as u16).to_le_bytes());
        payload.extend_from_slice(s.as_bytes());
    }
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&[1, 1, 0, 0]);
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&payload);
    let mut c = connect(&rx);
    c.send_raw(&bytes);
    let (code, message) = c.expect_error();
    assert_eq!(code, ErrorCode::Version, "{message}");
    assert!(message.contains("version 1"), "{message}");
    assert!(!rx.target("v1.img").exists());
}

#[test]
fn a_pass_journaled_before_a_receiver_kill_is_widened_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (mut rx, base, s1) = synced(dir.path());
    let p1 = [range(0, 64 << 10), range(MIB, 64 << 10)];
    let interrupted = changed(&base, &p1, 21);
    let mut c = connect(&rx);
    welcome_incremental(&mut c, &incremental_hello(2, S2, s1, &p1), &p1);
    send_ranges(&mut c, &interrupted, &p1);
    c.barrier(1);
    rx.kill9(); // no checkpoint, no journal at exit
    drop(c);
    let j = journal(&rx, TARGET).unwrap();
    assert!(
        !j.complete && j.base_sync_id == Some(s1),
        "journaled at start: {j:?}"
    );
    assert_eq!(j.planned.covered_bytes(), 2 * (64 << 10));

    rx.spawn();
    let p2 = [range(2 * MIB, 4096)];
    let source = changed(&base, &p2, 23);
    let mut c = connect(&rx);
    let w = welcome_incremental(&mut c, &incremental_hello(3, S3, s1, &p2), &p2);
    assert_eq!(
        w.replan,
        p1.to_vec(),
        "what the killed pass may have written"
    );
    send_ranges(&mut c, &source, &p2);
    send_ranges(&mut c, &source, &w.replan);
    c.barrier(1);
    c.done();
    drop(c);
    wait_for_journal(&rx, |j| j.complete);
    assert_eq!(std::fs::read(rx.target(TARGET)).unwrap(), source);
    assert_eq!(journal(&rx, TARGET).unwrap().last_sync_id, Some(S3));
}
