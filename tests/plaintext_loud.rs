//! Plaintext is loud: `--insecure-plaintext` logs a WARN line at the
//! default verbosity on both sides, and cannot be combined with
//! `--tls-dir` (a usage error, not a silent drop of the TLS settings).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Output, Stdio};

use common::*;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_warns(who: &str, text: &str) {
    let line = text
        .lines()
        .find(|l| l.contains("WARN") && l.contains("--insecure-plaintext"))
        .unwrap_or_else(|| {
            panic!("{who} logged no WARN about plaintext at default verbosity:\n{text}")
        });
    assert!(
        line.contains("TLS"),
        "{who}: the warning should say what to use: {line}"
    );
}

#[test]
fn both_sides_warn_about_plaintext_with_no_verbose_flag() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let serve_log = d.path().join("serve.log");
    let mut serve = diskferry()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--insecure-plaintext",
            "--target-root",
        ])
        .arg(&root)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&serve_log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(serve.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(
        line.starts_with("listening on"),
        "receiver did not start: {line:?}"
    );

    let src = d.path().join("src.img");
    sparse_file(&src, 4 << 20, &[(0, 100_000)], 5);
    let out = diskferry()
        .args([
            "send",
            src.to_str().unwrap(),
            "--to",
            &addr,
            "--target",
            "t.img",
        ])
        .args(["--insecure-plaintext", "--no-progress"])
        .output()
        .unwrap();
    let _ = serve.kill();
    let _ = serve.wait();
    assert!(out.status.success(), "send failed: {}", stderr(&out));
    assert_same(&src, &root.join("t.img"));
    assert_warns("send", &stderr(&out));
    assert_warns("serve", &std::fs::read_to_string(&serve_log).unwrap());
}

#[test]
fn plaintext_with_a_tls_dir_is_a_usage_error_on_both_sides() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    sparse_file(&src, 1 << 20, &[(0, 4096)], 5);
    let tls = d.path().join("tls");
    let send = diskferry()
        .args([
            "send",
            src.to_str().unwrap(),
            "--to",
            "127.0.0.1:9",
            "--target",
            "t",
        ])
        .args(["--insecure-plaintext", "--tls-dir"])
        .arg(&tls)
        .output()
        .unwrap();
    let serve = diskferry()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--insecure-plaintext",
            "--tls-dir",
        ])
        .arg(&tls)
        .arg("--target-root")
        .arg(d.path())
        .output()
        .unwrap();
    for (who, out) in [("send", send), ("serve", serve)] {
        let text = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{who}: {text}");
        assert!(
            text.contains("--insecure-plaintext")
                && text.contains("cannot be used with")
                && text.contains("--tls-dir"),
            "{who}: the message should name both flags: {text}"
        );
    }
}
