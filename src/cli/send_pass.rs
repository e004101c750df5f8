//! `send`'s pass flags: `--changed`, `--changed-areas`, `--base`,
//! `--change-id`, `--delta`, `--delta-block`, parsed into a
//! [`PassRequest`] before anything is opened or dialled.

use super::SendArgs;
use crate::replicate::send::pass::{DELTA_BLOCK_DEFAULT_BYTES, SyncId, parse_sync_id, sync_id_hex};
use crate::replicate::send::{ChangedSource, PassRequest};

/// `--changed`: `dirty-bitmap:NAME` or `changed-areas:FILE`.
pub(super) fn parse_changed(s: &str) -> Result<ChangedSource, String> {
    s.parse()
}

/// `--base`: a sync id, 32 hex characters.
pub(super) fn parse_base(s: &str) -> Result<SyncId, String> {
    parse_sync_id(s).map_err(|e| e.to_string())
}

/// `--delta-block`: a size such as 64k.
pub(super) fn parse_delta_block(s: &str) -> Result<u32, String> {
    let v = crate::size::parse_size(s)?;
    u32::try_from(v).map_err(|_| format!("{s} is too large"))
}

impl SendArgs {
    /// The pass these flags ask for, or why they do not make one.
    pub(super) fn pass(&self) -> Result<PassRequest, String> {
        let changed = match (&self.changed, &self.changed_areas) {
            (Some(c), None) => Some(c.clone()),
            (None, Some(path)) => Some(ChangedSource::ChangedAreas(path.clone())),
            (None, None) => None,
            (Some(_), Some(_)) => {
                return Err(
                    "--changed and --changed-areas name the changes twice: give one".into(),
                );
            }
        };
        match (changed, self.delta) {
            (Some(_), true) => Err(
                "--delta compares content and takes no --changed/--changed-areas: give one".into(),
            ),
            (Some(_), false) if self.restart => Err(
                "--restart discards what the receiver holds and sends everything: it cannot \
                 start from a --base (drop --changed/--changed-areas)"
                    .into(),
            ),
            (Some(changed), false) => Ok(PassRequest::Incremental {
                changed,
                base: self.base.unwrap_or([0; 16]),
            }),
            (None, delta) => {
                if let Some(base) = &self.base {
                    return Err(format!(
                        "--base {} names the sync an incremental starts from: add --changed \
                         dirty-bitmap:NAME or --changed-areas FILE{}",
                        sync_id_hex(base),
                        if delta {
                            " (a --delta pass needs no base)"
                        } else {
                            ""
                        }
                    ));
                }
                if !delta {
                    if self.delta_block.is_some() {
                        return Err("--delta-block needs --delta".into());
                    }
                    return Ok(PassRequest::Full);
                }
                Ok(PassRequest::Delta {
                    block_bytes: self.delta_block.unwrap_or(DELTA_BLOCK_DEFAULT_BYTES),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> Result<SendArgs, clap::Error> {
        let mut v = vec![
            "diskferry",
            "send",
            "a.qcow2",
            "--to",
            "h:1",
            "--target",
            "t",
        ];
        v.extend_from_slice(&["--insecure-plaintext"]);
        v.extend_from_slice(extra);
        match super::super::Cli::try_parse_from(v)?.command {
            super::super::Command::Send(a) => Ok(*a),
            _ => unreachable!(),
        }
    }

    const BASE: &str = "00112233445566778899aabbccddeeff";

    #[test]
    fn pass_flags_make_the_pass_the_contract_names() {
        let p = args(&["--changed", "dirty-bitmap:b0", "--base", BASE])
            .unwrap()
            .pass()
            .unwrap();
        assert_eq!(
            p,
            PassRequest::Incremental {
                changed: ChangedSource::DirtyBitmap("b0".into()),
                base: parse_sync_id(BASE).unwrap(),
            }
        );
        let p = args(&["--changed-areas", "c.json", "--base", BASE])
            .unwrap()
            .pass()
            .unwrap();
        assert!(matches!(
            p,
            PassRequest::Incremental { changed: ChangedSource::ChangedAreas(f), .. } if f.to_str() == Some("c.json")
        ));
        let p = args(&["--changed", "changed-areas:c.json"]).unwrap().pass();
        assert!(
            matches!(p, Ok(PassRequest::Incremental { base, .. }) if base == [0; 16]),
            "{p:?}"
        );
        let p = args(&["--delta"]).unwrap().pass().unwrap();
        assert_eq!(p, PassRequest::Delta { block_bytes: 65536 });
        let p = args(&["--delta", "--delta-block", "1M"])
            .unwrap()
            .pass()
            .unwrap();
        assert_eq!(
            p,
            PassRequest::Delta {
                block_bytes: 1 << 20
            }
        );
        assert_eq!(args(&[]).unwrap().pass().unwrap(), PassRequest::Full);
    }

    #[test]
    fn contradictory_pass_flags_are_refused_naming_the_flags() {
        let e = args(&["--base", BASE]).unwrap().pass().unwrap_err();
        assert!(e.contains("--base") && e.contains("--changed"), "{e}");
        let e = args(&["--base", BASE, "--delta"])
            .unwrap()
            .pass()
            .unwrap_err();
        assert!(e.contains("needs no base"), "{e}");
        let e = args(&["--delta-block", "64k"]).unwrap().pass().unwrap_err();
        assert!(e.contains("--delta"), "{e}");
        for bad in [
            &["--changed", "bitmap:b0"][..],
            &["--changed", "dirty-bitmap:"],
            &["--base", "xyz", "--changed", "dirty-bitmap:b0"],
            &["--base", &"0".repeat(32), "--changed", "dirty-bitmap:b0"],
            &["--changed", "dirty-bitmap:b0", "--delta"],
            &["--changed", "dirty-bitmap:b0", "--changed-areas", "f"],
            &["--changed", "dirty-bitmap:b0", "--restart"],
        ] {
            let refused = args(bad).map_or(true, |a| a.pass().is_err());
            assert!(refused, "{bad:?}");
        }
    }
}
