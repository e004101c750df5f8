//! The job file: a VM's disks in TOML, the shape the daemon will take too.
//!
//! ```toml
//! name = "vm1"
//! [[disk]]
//! source = "nbd+unix:///sda?socket=/run/vm1.sock"
//! target = "vm1/sda.img"
//! [[disk]]
//! source = "/var/lib/images/vm1-data.qcow2"
//! target = "vm1/sdb.img"
//! ```
//!
//! Sans-IO: text in, a [`JobFile`] or an error naming the line and field
//! out. Nothing is opened or resolved against the file system here;
//! targets are compared as written, after lexical normalisation
//! (`./a//b` is `a/b`), so two spellings of one path are refused too.
#![forbid(unsafe_code)]

use serde::Deserialize;

/// Longest job file accepted (a VM has a handful of disks).
pub const JOB_FILE_MAX_BYTES: usize = 1 << 20;
/// Most disks in one job.
pub const DISKS_MAX: usize = 256;

/// A parsed, checked job file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFile {
    pub name: String,
    pub disks: Vec<DiskEntry>,
}

/// One `[[disk]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskEntry {
    pub source: String,
    pub target: String,
    /// Line of the disk's `target` key (1-based), for later messages.
    pub line: usize,
}

/// Why a job file was refused. Each names the line (1-based) it is about.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JobFileError {
    #[error("the job file is larger than {JOB_FILE_MAX_BYTES} bytes")]
    TooLarge,
    /// TOML syntax, a missing or unknown key, a value of the wrong type.
    #[error("line {line}: {message}")]
    Syntax { line: usize, message: String },
    #[error("line {line}: no [[disk]] in the job; a job needs at least one")]
    NoDisk { line: usize },
    #[error("line {line}: more than {DISKS_MAX} disks in one job")]
    TooManyDisks { line: usize },
    #[error("line {line}: field `{field}` is empty")]
    Empty { line: usize, field: &'static str },
    #[error("line {line}: target {target:?} is also the target of the disk at line {first_line}")]
    DuplicateTarget {
        line: usize,
        first_line: usize,
        target: String,
    },
}

impl JobFileError {
    /// The line the error is about.
    pub fn line(&self) -> Option<usize> {
        match self {
            JobFileError::TooLarge => None,
            JobFileError::Syntax { line, .. }
            | JobFileError::NoDisk { line }
            | JobFileError::TooManyDisks { line }
            | JobFileError::Empty { line, .. }
            | JobFileError::DuplicateTarget { line, .. } => Some(*line),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    name: toml::Spanned<String>,
    #[serde(default)]
    disk: Vec<RawDisk>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    source: toml::Spanned<String>,
    target: toml::Spanned<String>,
}

/// Parse and check a job file.
pub fn parse(text: &str) -> Result<JobFile, JobFileError> {
    if text.len() > JOB_FILE_MAX_BYTES {
        return Err(JobFileError::TooLarge);
    }
    let raw: RawJob = toml::from_str(text).map_err(|e| JobFileError::Syntax {
        line: e.span().map_or(1, |s| line_of(text, s.start)),
        message: e.message().trim_end().to_string(),
    })?;
    let name_line = line_of(text, raw.name.span().start);
    if raw.name.get_ref().trim().is_empty() {
        return Err(JobFileError::Empty {
            line: name_line,
            field: "name",
        });
    }
    if raw.disk.is_empty() {
        return Err(JobFileError::NoDisk { line: name_line });
    }
    let mut disks: Vec<DiskEntry> = Vec::with_capacity(raw.disk.len());
    let mut seen: Vec<(String, usize)> = Vec::new();
    for d in raw.disk {
        let line = line_of(text, d.target.span().start);
        if disks.len() == DISKS_MAX {
            return Err(JobFileError::TooManyDisks { line });
        }
        for (field, value) in [("source", &d.source), ("target", &d.target)] {
            if value.get_ref().trim().is_empty() {
                let line = line_of(text, value.span().start);
                return Err(JobFileError::Empty { line, field });
            }
        }
        let target = d.target.into_inner();
        let key = normalise(&target);
        if let Some((_, first_line)) = seen.iter().find(|(k, _)| *k == key) {
            return Err(JobFileError::DuplicateTarget {
                line,
                first_line: *first_line,
                target,
            });
        }
        seen.push((key, line));
        disks.push(DiskEntry {
            source: d.source.into_inner(),
            target,
            line,
        });
    }
    Ok(JobFile {
        name: raw.name.into_inner(),
        disks,
    })
}

/// 1-based line of byte `offset`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// A path as written, without `.` components, repeated or trailing
/// slashes. `..` is kept: resolving it needs the file system.
fn normalise(path: &str) -> String {
    let absolute = path.starts_with('/');
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    let joined = parts.join("/");
    if absolute {
        format!("/{joined}")
    } else {
        joined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"name = "vm1"
[[disk]]
source = "nbd+unix:///sda?socket=/run/vm1.sock"
target = "vm1/sda.img"
[[disk]]
source = "/var/lib/images/vm1-data.qcow2"
target = "vm1/sdb.img"
"#;

    #[test]
    fn the_documented_example_parses() {
        let job = parse(GOOD).unwrap();
        assert_eq!(job.name, "vm1");
        assert_eq!(job.disks.len(), 2);
        assert_eq!(job.disks[0].source, "nbd+unix:///sda?socket=/run/vm1.sock");
        assert_eq!(job.disks[1].target, "vm1/sdb.img");
        assert_eq!((job.disks[0].line, job.disks[1].line), (4, 7));
    }

    #[test]
    fn a_missing_field_names_its_line() {
        let text = "name = \"vm1\"\n[[disk]]\nsource = \"a.img\"\n";
        let e = parse(text).unwrap_err();
        assert!(matches!(e, JobFileError::Syntax { .. }), "{e}");
        assert!(e.to_string().contains("target"), "{e}");
        assert!(matches!(e.line(), Some(2..=3)), "{e}");
    }

    #[test]
    fn an_unknown_key_names_its_line_and_the_key() {
        let text = "name = \"vm1\"\n[[disk]]\nsource = \"a.img\"\ntarget = \"b.img\"\nformat = \"qcow2\"\n";
        let e = parse(text).unwrap_err();
        assert_eq!(e.line(), Some(5), "{e}");
        assert!(e.to_string().contains("format"), "{e}");
        let top = parse("nme = \"vm1\"\n").unwrap_err();
        assert_eq!(top.line(), Some(1), "{top}");
    }

    #[test]
    fn duplicate_targets_are_refused_also_when_spelt_differently() {
        let text = "name = \"vm1\"\n[[disk]]\nsource = \"a\"\ntarget = \"vm1/sda.img\"\n\
                    [[disk]]\nsource = \"b\"\ntarget = \"vm1/sda.img\"\n";
        let e = parse(text).unwrap_err();
        assert_eq!(
            e,
            JobFileError::DuplicateTarget {
                line: 7,
                first_line: 4,
                target: "vm1/sda.img".into()
            }
        );
        let text = text.replacen("\"vm1/sda.img\"", "\"./vm1//sda.img\"", 1);
        assert!(matches!(
            parse(&text).unwrap_err(),
            JobFileError::DuplicateTarget { line: 7, .. }
        ));
    }

    #[test]
    fn a_job_without_disks_or_with_empty_fields_is_refused() {
        assert_eq!(
            parse("\n\nname = \"vm1\"\n").unwrap_err(),
            JobFileError::NoDisk { line: 3 }
        );
        let e = parse("name = \"vm1\"\n[[disk]]\nsource = \"\"\ntarget = \"b\"\n").unwrap_err();
        assert_eq!(
            e,
            JobFileError::Empty {
                line: 3,
                field: "source"
            }
        );
        let e = parse("name = 3\n").unwrap_err();
        assert_eq!(e.line(), Some(1), "{e}");
    }

    #[test]
    fn normalising_keeps_meaningful_differences() {
        assert_eq!(normalise("./a//b/"), "a/b");
        assert_eq!(normalise("/a/./b"), "/a/b");
        assert_ne!(normalise("/a/b"), normalise("a/b"));
        assert_eq!(normalise("a/../b"), "a/../b");
    }
}
