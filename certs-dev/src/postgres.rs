//! A throwaway PostgreSQL cluster on loopback for tests and benchmarks: `initdb` in a temporary
//! folder, `pg_ctl start` on a free 127.0.0.1 port, a database `meshsign` owned by the role
//! `meshsign` (trust authentication, loopback only), removed on drop. The server speaks TLS
//! with a certificate for `localhost` / `127.0.0.1` from a CA of its own ([`LocalPostgres::ca_file`]),
//! so a site connects to it as to a real one (`[store] ca_file`, verify-full).
//!
//! The binaries come from `MESHSIGN_PG_BIN`, else the newest `/usr/lib/postgresql/<v>/bin`
//! (Debian's layout; `.ci/run` installs the `postgresql` package when it is missing). PostgreSQL
//! refuses to run as root: as root, the cluster runs as `nobody` (through `runuser`), with the
//! folder handed to that user.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running cluster; stopped (immediately) and deleted on drop.
#[derive(Debug)]
pub struct LocalPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    run_as: Option<&'static str>,
}

fn io(what: &str, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("{what}: {e}"))
}

/// Where the PostgreSQL binaries are.
pub fn bin_dir() -> std::io::Result<PathBuf> {
    if let Some(b) = std::env::var_os("MESHSIGN_PG_BIN") {
        return Ok(PathBuf::from(b));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| {
            io(
                "no PostgreSQL in /usr/lib/postgresql (install `postgresql`)",
                e,
            )
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, b)| b)
        .ok_or_else(|| io("PostgreSQL", "no /usr/lib/postgresql/<version>/bin/initdb"))
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| {
            use std::os::unix::fs::MetadataExt as _;
            m.uid() == 0
        })
        .unwrap_or(false)
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl LocalPostgres {
    /// Creates and starts a cluster with a database `meshsign`.
    pub fn start() -> std::io::Result<Self> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new().prefix("meshsign-pg-").tempdir()?;
        let run_as = is_root().then_some("nobody");
        if let Some(user) = run_as {
            let ok = Command::new("chown")
                .arg(format!("{user}:"))
                .arg(dir.path())
                .status()?
                .success();
            if !ok {
                return Err(io("chown", dir.path().display()));
            }
        }
        let mut pg = Self {
            dir,
            bin,
            port: free_port()?,
            run_as,
        };
        pg.write_tls_files()?;
        pg.run(
            "initdb",
            &[
                "-D",
                &pg.data().to_string_lossy(),
                "-U",
                "meshsign",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        // The port was free when picked, but anything on the machine (a parallel test's
        // listener on port 0) may take it before PostgreSQL binds it: then a new port, a few
        // times. Any other failure is returned with the server's log.
        let mut attempt = 0;
        while let Err(e) = pg.start_again() {
            let log = std::fs::read_to_string(pg.dir.path().join("log")).unwrap_or_default();
            attempt += 1;
            if attempt < 5 && log.contains("could not bind") {
                pg.port = free_port()?;
                continue;
            }
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            return Err(std::io::Error::other(format!(
                "{e}\nserver log (last lines):\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )));
        }
        pg.run(
            "createdb",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port.to_string(),
                "-U",
                "meshsign",
                "meshsign",
            ],
        )?;
        Ok(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The CA (PEM) that issued the server's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A site config's `[store]` section for this cluster: its url, TLS against its CA.
    pub fn store_section(&self) -> String {
        format!(
            "\n[store]\nengine = \"postgres\"\nurl = \"{}\"\nca_file = \"{}\"\npool_size = 4\n",
            self.url(),
            self.ca_file().display()
        )
    }

    /// A fresh CA and a server certificate for localhost, 127.0.0.1 and ::1; the key is the
    /// server user's, mode 0600, as PostgreSQL demands.
    fn write_tls_files(&self) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let pki = crate::DevPki::generate("postgres.test").map_err(|e| io("TLS files", e))?;
        std::fs::write(self.ca_file(), &pki.server_ca_pem)?;
        let (crt, key) = (
            self.dir.path().join("server.crt"),
            self.dir.path().join("server.key"),
        );
        std::fs::write(&crt, &pki.server.cert_pem)?;
        std::fs::write(&key, pki.server.key_pem.as_bytes())?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        if let Some(user) = self.run_as {
            let ok = Command::new("chown")
                .arg(format!("{user}:"))
                .args([&crt, &key])
                .status()?
                .success();
            if !ok {
                return Err(io("chown", key.display()));
            }
        }
        Ok(())
    }

    fn run(&self, tool: &str, args: &[&str]) -> std::io::Result<()> {
        let exe = self.bin.join(tool);
        let mut cmd = match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out = cmd.args(args).current_dir(self.dir.path()).output()?;
        if out.status.success() {
            Ok(())
        } else {
            Err(io(
                &format!("{tool} {}", args.join(" ")),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            ))
        }
    }

    /// Runs each of `statements` through `psql` as the cluster's superuser, one command each
    /// (so `VACUUM`, which refuses a transaction block, may be one), stopping at the first
    /// error.
    pub fn sql(&self, statements: &[&str]) -> std::io::Result<()> {
        let port = self.port.to_string();
        let mut args = vec![
            "-X",
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "meshsign",
            "-d",
            "meshsign",
            "-v",
            "ON_ERROR_STOP=1",
        ];
        for s in statements {
            args.extend(["-c", s]);
        }
        self.run("psql", &args)
    }

    /// (Re)starts the server on the same port and data, waiting until it accepts connections.
    pub fn start_again(&self) -> std::io::Result<()> {
        let opts = format!(
            "-k {dir} -p {} -c listen_addresses=127.0.0.1 -c max_connections=200 -c ssl=on \
             -c ssl_cert_file={dir}/server.crt -c ssl_key_file={dir}/server.key",
            self.port,
            dir = self.dir.path().display(),
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().to_string_lossy(),
                "-l",
                &self.dir.path().join("log").to_string_lossy(),
                "-o",
                &opts,
                "-w",
                "start",
            ],
        )
    }

    /// Stops the server now (`immediate`: what a crash or an outage looks like to clients).
    pub fn stop(&self) -> std::io::Result<()> {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().to_string_lossy(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        )
    }

    /// `postgresql://meshsign@127.0.0.1:<port>/meshsign`.
    pub fn url(&self) -> String {
        format!("postgresql://meshsign@127.0.0.1:{}/meshsign", self.port)
    }

    /// CPU seconds used so far by the server and its backends: the postmaster (from
    /// `postmaster.pid`), every process whose parent it is, and the children it reaped (a
    /// backend or an autovacuum worker that exited keeps counting: without them the sum fell
    /// when one did). A live process counts its scheduler run time (`/proc/<pid>/schedstat`,
    /// nanoseconds): a backend's queries run in bursts shorter than a clock tick, and `utime`
    /// and `stime` are sampled at the ticks, so a short window read 0 as often as not. `None`
    /// if not running.
    pub fn cpu_seconds(&self, ticks_per_second: f64) -> Option<f64> {
        let pid_file = std::fs::read_to_string(self.data().join("postmaster.pid")).ok()?;
        let postmaster: u32 = pid_file.lines().next()?.trim().parse().ok()?;
        // (ppid, own CPU seconds, reaped children's CPU seconds)
        let stat = |pid: &str| -> Option<(u32, f64, f64)> {
            let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let rest = text.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ppid = f.get(1)?.parse().ok()?;
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
            let ran = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
                .ok()
                .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
                .map(|ns| ns / 1e9);
            let own = match ran {
                Some(seconds) => seconds,
                None => (num(11)? + num(12)?) / ticks_per_second,
            };
            Some((ppid, own, (num(13)? + num(14)?) / ticks_per_second))
        };
        let (_, own, reaped) = stat(&postmaster.to_string())?;
        let mut total = own + reaped;
        for e in std::fs::read_dir("/proc").ok()?.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.bytes().all(|b| b.is_ascii_digit())
                && let Some((ppid, seconds, _)) = stat(&name)
                && ppid == postmaster
            {
                total += seconds;
            }
        }
        Some(total)
    }

    /// The server's processes: the postmaster (from `postmaster.pid`) and its children.
    fn pids(&self) -> Vec<u32> {
        let Some(postmaster) = std::fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next()?.trim().parse::<u32>().ok())
        else {
            return Vec::new();
        };
        let parent = |pid: &str| -> Option<u32> {
            let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            text.rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        };
        let mut pids = vec![postmaster];
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.bytes().all(|b| b.is_ascii_digit())
                && parent(&name) == Some(postmaster)
                && let Ok(pid) = name.parse()
            {
                pids.push(pid);
            }
        }
        pids
    }

    /// Sends `signal` (`STOP`, `CONT`) to the server and its backends: with `STOP` the server
    /// keeps its sockets open (the kernel still accepts and acknowledges) and answers nothing.
    pub fn signal(&self, signal: &str) -> std::io::Result<()> {
        let pids = self.pids();
        if pids.is_empty() {
            return Err(std::io::Error::other("the server is not running"));
        }
        let kill = |pids: &[u32]| -> std::io::Result<()> {
            let status = std::process::Command::new("kill")
                .arg(format!("-{signal}"))
                .args(pids.iter().map(u32::to_string))
                .status()?;
            if !status.success() {
                return Err(std::io::Error::other(format!("kill -{signal}: {status}")));
            }
            Ok(())
        };
        kill(&pids)?;
        // A backend forked between listing the children and signalling the postmaster was
        // not listed: list again until no new child shows up (the postmaster, stopped, forks
        // no more). Without this a reconnecting client's fresh backend kept answering.
        let mut seen = pids;
        for _ in 0..20 {
            let new: Vec<u32> = self
                .pids()
                .into_iter()
                .filter(|p| !seen.contains(p))
                .collect();
            if new.is_empty() {
                break;
            }
            // A child that exited in between is no error.
            let _ = kill(&new);
            seen.extend(new);
        }
        Ok(())
    }

    /// The cluster's folder (its log is `log` there).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
