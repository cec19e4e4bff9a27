//! The Kinesis server of the benches (ferrokinesis in a child process of the bench binary,
//! so that the CPU the bench process spends is not the server's) and what a bench reads of a
//! process from `/proc`: CPU time and resident memory.
//!
//! A bench binary that uses [`Server`] answers `BINARY serve [--enforce-limits]` by calling
//! [`serve`].

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Runs ferrokinesis until stdin closes, printing its address first. With `enforce_limits`,
/// each shard takes at most 1,000 records and 1 MiB a second, as Kinesis does: more gets
/// `ProvisionedThroughputExceededException` entries in `PutRecords` answers.
// The address goes to the parent through stdout.
#[allow(clippy::print_stdout)]
pub fn serve(enforce_limits: bool) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let options = ferrokinesis::store::StoreOptions {
            create_stream_ms: 0,
            delete_stream_ms: 0,
            update_stream_ms: 0,
            shard_limit: 1000,
            enforce_limits,
            ..Default::default()
        };
        let (app, _store) = ferrokinesis::create_app(options);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        println!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        // The parent closes our stdin when it is done (or dies).
        tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            while std::io::stdin().read_line(&mut line).unwrap_or(0) > 0 {}
        })
        .await
        .ok();
    });
}

/// The ferrokinesis child process and its address; stopped when dropped.
#[derive(Debug)]
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Server {
    /// Starts `THIS_BINARY serve` (with `--enforce-limits` when asked) and reads its address.
    pub fn start(enforce_limits: bool) -> Self {
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .arg("serve")
            .args(enforce_limits.then_some("--enforce-limits"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the ferrokinesis child");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("its address");
        Server {
            child,
            url: line.trim().to_owned(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process whose CPU and memory the bench reads: this one or a child.
#[derive(Clone, Copy, Debug)]
pub enum Process {
    /// The bench itself.
    This,
    /// A child process, by pid.
    Child(u32),
}

impl Process {
    fn proc_file(self, file: &str) -> String {
        let path = match self {
            Process::This => format!("/proc/self/{file}"),
            Process::Child(pid) => format!("/proc/{pid}/{file}"),
        };
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// User + system CPU time.
    pub fn cpu_time(self) -> Duration {
        let stat = self.proc_file("stat");
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64)
    }

    /// (resident now, peak resident) in bytes: `VmRSS` and `VmHWM`.
    pub fn resident(self) -> (u64, u64) {
        let status = self.proc_file("status");
        let kib = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} in /proc status"))
        };
        (kib("VmRSS:") * 1024, kib("VmHWM:") * 1024)
    }
}

fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}
