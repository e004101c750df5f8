//! Two network namespaces joined by a veth pair (10.213.7.1 in `a`,
//! 10.213.7.2 in `b`), optionally shaped with tc tbf; deleted on drop.
//!
//! Include with `#[path = "support/netns.rs"] mod netns;`.
#![allow(dead_code)]

use std::process::Command;

/// Two network namespaces joined by a veth pair, optionally shaped.
pub struct Netns {
    pub a: String,
    pub b: String,
}

impl Netns {
    /// Panics when the namespaces cannot be made: these machines allow them
    /// (root, iproute2, veth, tc tbf), so a test that cannot run fails
    /// rather than passing unrun.
    pub fn new(tag: &str, shape: Option<&str>) -> Self {
        let id = format!("{}{}", tag, std::process::id() % 100_000);
        let (a, b) = (format!("dfa{id}"), format!("dfb{id}"));
        let run = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        assert!(
            run(&["netns", "add", &a]),
            "cannot create network namespaces here (ip netns add {a})"
        );
        let ns = Netns {
            a: a.clone(),
            b: b.clone(),
        };
        let va = format!("va{id}");
        let vb = format!("vb{id}");
        // Names and addresses hold no spaces: each step splits into its args.
        let steps = [
            format!("netns add {b}"),
            format!("link add {va} type veth peer name {vb}"),
            format!("link set {va} netns {a}"),
            format!("link set {vb} netns {b}"),
            format!("-n {a} addr add 10.213.7.1/24 dev {va}"),
            format!("-n {b} addr add 10.213.7.2/24 dev {vb}"),
            format!("-n {a} link set {va} up"),
            format!("-n {b} link set {vb} up"),
            format!("-n {a} link set lo up"),
            format!("-n {b} link set lo up"),
        ];
        for step in &steps {
            let args: Vec<&str> = step.split_whitespace().collect();
            assert!(run(&args), "ip {step} failed");
        }
        if let Some(rate) = shape {
            let st = Command::new("ip")
                .args([
                    "netns", "exec", &a, "tc", "qdisc", "add", "dev", &va, "root", "tbf", "rate",
                    rate, "burst", "256kb", "latency", "50ms",
                ])
                .status()
                .unwrap();
            assert!(st.success(), "tc qdisc add … tbf rate {rate} refused");
        }
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}
