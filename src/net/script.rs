//! QEMU-style ifup/ifdown scripts: run with the TAP name as $1.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("cannot run {what} {path}: {source}")]
    Spawn {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} {tap} failed: {status}")]
    Failed {
        what: &'static str,
        path: PathBuf,
        tap: String,
        status: std::process::ExitStatus,
    },
}

/// Runs `script TAP` and waits; `what` is "script" or "downscript".
pub fn run(script: &Path, tap: &str, what: &'static str) -> Result<(), ScriptError> {
    let status = Command::new(script)
        .arg(tap)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .map_err(|source| ScriptError::Spawn {
            what,
            path: script.into(),
            source,
        })?;
    if !status.success() {
        return Err(ScriptError::Failed {
            what,
            path: script.into(),
            tap: tap.into(),
            status,
        });
    }
    Ok(())
}
