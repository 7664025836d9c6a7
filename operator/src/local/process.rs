//! Member processes by PID: ours (children) and ones a previous operator run started and
//! left running when it crashed, which we adopt rather than start twice on the same ports.

use std::path::Path;
use std::time::Duration;

use tokio::process::Child;

pub enum Process {
    Child(Child),
    /// Started by an earlier run of the operator; not our child, so watched through /proc.
    Adopted {
        pid: u32,
        data_dir: String,
    },
}

impl Process {
    pub fn pid(&self) -> Option<u32> {
        match self {
            Process::Child(child) => child.id(),
            Process::Adopted { pid, .. } => Some(*pid),
        }
    }

    /// Whether the process still runs; an exited child is reaped here.
    pub fn is_running(&mut self) -> bool {
        match self {
            Process::Child(child) => matches!(child.try_wait(), Ok(None)),
            Process::Adopted { pid, data_dir } => runs_with_arg(*pid, Path::new(data_dir.as_str())),
        }
    }

    pub fn signal(&self, signal: i32) {
        if let Some(pid) = self.pid() {
            send_signal(pid, signal);
        }
    }

    /// SIGTERM, so a leader hands over leadership and the log is closed cleanly; SIGKILL
    /// after `grace`.
    pub async fn stop_all(processes: &mut [&mut Process], grace: Duration) {
        for process in processes.iter_mut() {
            // An adopted member that exited may have left its PID to another process.
            if process.is_running() {
                process.signal(libc::SIGTERM);
            }
        }
        let deadline = tokio::time::Instant::now() + grace;
        while processes.iter_mut().any(|p| p.is_running()) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for process in processes.iter_mut() {
            if process.is_running() {
                tracing::warn!(pid = process.pid(), "member did not stop within {grace:?}; killing it");
                process.signal(libc::SIGKILL);
            }
            if let Process::Child(child) = process {
                let _ = child.wait().await;
            }
        }
        // An adopted process is reaped by init, not us: wait until it is gone.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while processes.iter_mut().any(|p| p.is_running()) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Signals the process group `pid` leads (a process started with `process_group(0)`).
pub fn signal_group(pid: u32, signal: i32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe {
        libc::kill(-pid, signal);
    }
}

pub fn send_signal(pid: u32, signal: i32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Whether `pid` is a live (not zombie) process with `arg` among its arguments (a member's
/// data directory, a backup's report file), so a PID reused by an unrelated process is never
/// taken for ours.
pub fn runs_with_arg(pid: u32, arg: &Path) -> bool {
    let proc_dir = Path::new("/proc").join(pid.to_string());
    let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) else { return false };
    let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else { return false };
    // The state follows the parenthesised command name, which may itself contain spaces.
    let zombie = stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    let wanted = arg.as_os_str().as_encoded_bytes();
    !zombie && cmdline.split(|b| *b == 0).any(|arg| arg == wanted)
}
