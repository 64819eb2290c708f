//! A real etcd (Debian's `etcd-server`, installed by `.ci/run`) for the cluster tests: one
//! process per test that needs it, on free loopback ports, in a temporary directory,
//! ended with the test (and with the test process, should that die first).

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::common::WAIT;

pub struct Etcd {
    child: Option<Child>,
    pub client: SocketAddr,
    peer: SocketAddr,
    pub dir: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Etcd {
    pub fn start() -> Etcd {
        let dir = std::env::temp_dir().join(format!("ringmq-etcd-{}-{}", std::process::id(), free_port()));
        let client: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let peer: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut etcd = Etcd { child: None, client, peer, dir };
        etcd.restart();
        etcd
    }

    /// `etcd://HOST:PORT` for `--cluster`.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.client)
    }

    /// Starts (again, on the same data) and waits until it answers.
    pub fn restart(&mut self) {
        let binary = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("etcd is installed (apt-get install etcd-server; .ci/run does it)");
        let mut command = Command::new(binary);
        command
            .arg("--name")
            .arg("test")
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--listen-client-urls")
            .arg(format!("http://{}", self.client))
            .arg("--advertise-client-urls")
            .arg(format!("http://{}", self.client))
            .arg("--listen-peer-urls")
            .arg(format!("http://{}", self.peer))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://{}", self.peer))
            .arg("--initial-cluster")
            .arg(format!("test=http://{}", self.peer))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only prctl between fork and exec: etcd ends with the test process.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        self.child = Some(command.spawn().expect("etcd starts"));
        let deadline = Instant::now() + WAIT * 3;
        while !self.answers() {
            assert!(Instant::now() < deadline, "etcd did not answer on {}", self.client);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether a range request succeeds (etcd is up and has a leader).
    fn answers(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(self.client) else { return false };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let body = r#"{"key":"AA=="}"#;
        let request = format!(
            "POST /v3/kv/range HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        use std::io::{Read, Write};
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer.starts_with("HTTP/1.1 200") && answer.contains("revision")
    }

    /// Kills it (SIGKILL): the cluster's control plane is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
