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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::test_util::TempDir;

    #[test]
    fn script_gets_the_tap_name_as_its_only_argument() {
        let dir = TempDir::new();
        let out = dir.path("arg");
        let s = dir.script("up", &format!("echo \"$1 $#\" > '{}'", out.display()));
        run(&s, "tap7", "script").unwrap();
        assert_eq!(dir.read("arg"), "tap7 1\n");
    }

    #[test]
    fn failure_names_what_script_tap_and_status() {
        let dir = TempDir::new();
        let s = dir.script("fail", "exit 3");
        let err = run(&s, "tap7", "downscript").unwrap_err();
        assert!(matches!(err, ScriptError::Failed { .. }), "{err}");
        // tests/net.rs looks for "script PATH TAP failed".
        assert_eq!(
            err.to_string(),
            format!("downscript {} tap7 failed: exit status: 3", s.display())
        );

        let s = dir.script("killed", "kill -9 $$");
        let msg = run(&s, "tap7", "script").unwrap_err().to_string();
        assert!(msg.contains("signal: 9"), "{msg}");
    }

    #[test]
    fn missing_or_non_executable_script_is_a_spawn_error() {
        let dir = TempDir::new();
        let err = run(&dir.path("nope"), "tap7", "script").unwrap_err();
        assert!(matches!(err, ScriptError::Spawn { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.starts_with("cannot run script "), "{msg}");
        assert!(msg.contains("nope"), "{msg}");

        let s = dir.script("noexec", "true");
        std::fs::set_permissions(&s, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let err = run(&s, "tap7", "script").unwrap_err();
        assert!(matches!(err, ScriptError::Spawn { .. }), "{err}");
    }

    #[test]
    fn stdin_and_stdout_are_dev_null() {
        // stdout is the guest console's: script chatter must not reach it.
        let dir = TempDir::new();
        let out = dir.path("fds");
        let s = dir.script(
            "up",
            // The shell's own fds ($$, which a subshell keeps), read
            // before any redirection of the shell's stdout.
            &format!(
                "r=$(readlink /proc/$$/fd/0 /proc/$$/fd/1)\necho \"$r\" > '{}'",
                out.display()
            ),
        );
        run(&s, "tap7", "script").unwrap();
        assert_eq!(dir.read("fds"), "/dev/null\n/dev/null\n");
    }
}
