//! `ringmq passwd [-c] [-b] [-D] FILE USER [PASSWORD]`: adds, updates and deletes users
//! of a password file ([`crate::auth::passwd`]), as `mosquitto_passwd` does.
//!
//! New passwords are hashed with argon2id, which Mosquitto cannot read; the other lines
//! of the file (Mosquitto's `$6$`/`$7$` entries, comments, blank lines) are kept byte for
//! byte. A file that ringmq would refuse is not edited (except by `-c`, which replaces
//! it). The new file is written beside the old one and renamed over it, so a reader (the
//! broker reloading) sees the old file or the new one, never half of one.

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use super::passwd::{read_text, split_line, HashError, Line, PasswordFile, PasswordFileError, PasswordHash};

#[cfg(test)]
mod tests;

/// Longest user name and password: MQTT's limit for a string (and Mosquitto's).
const MAX_FIELD_LEN: usize = 65_535;

const USAGE: &str = "\
ringmq passwd manages password files for ringmq (Mosquitto's format).

Usage: ringmq passwd [-c | -D] passwordfile username
       ringmq passwd [-c] -b passwordfile username password
 -b : run in batch mode to allow passing passwords on the command line.
 -c : create a new password file. This will overwrite existing files.
 -D : delete the username rather than adding/updating its password.

New passwords are hashed with argon2id: ringmq reads files written by
mosquitto_passwd, but Mosquitto cannot read the entries this command writes.
";

/// Why `ringmq passwd` failed; the messages follow `mosquitto_passwd`'s.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("wrong arguments")]
    Usage,
    #[error("Error: Unknown option '{0}'.")]
    UnknownOption(String),
    #[error("Error: -c and -D cannot be used together.")]
    CreateAndDelete,
    #[error("Error: -b and -D cannot be used together.")]
    BatchAndDelete,
    #[error("Error: Username {0}.")]
    BadUser(&'static str),
    #[error("Error: Password must be less than 65536 characters long.")]
    PasswordTooLong,
    #[error("Error: Empty password.")]
    EmptyPassword,
    #[error("Error: Passwords do not match.")]
    PasswordsDiffer,
    #[error("Error: No password given.")]
    NoPassword,
    #[error("Error: Unable to read the password: {0}.")]
    Prompt(std::io::Error),
    #[error("Warning: User {0} not found in password file.")]
    UserNotFound(String),
    #[error("Error: Unable to open password file {}: {source}.", path.display())]
    Open { path: PathBuf, source: std::io::Error },
    #[error("Error: {0}")]
    File(PasswordFileError),
    #[error("Error: Unable to hash password: {0}.")]
    Hash(#[from] HashError),
    #[error("Error: Unable to write password file {}: {source}.", path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

impl From<PasswordFileError> for CliError {
    fn from(e: PasswordFileError) -> CliError {
        match e {
            PasswordFileError::Io { path, source } => CliError::Open { path, source },
            e => CliError::File(e),
        }
    }
}

/// What to do to the user's line.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    /// Set the password: the one given with `-b`, or `None` to ask for it.
    Set(Option<Vec<u8>>),
    Delete,
}

#[derive(Debug, PartialEq, Eq)]
struct Invocation {
    create: bool,
    file: PathBuf,
    user: String,
    change: Change,
}

#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Help,
    Run(Invocation),
}

/// Runs `ringmq passwd`; `args` are the words after `passwd`. Returns the exit code: 0,
/// or 1 with the reason on stderr.
pub fn run(args: &[OsString]) -> i32 {
    let result = parse_args(args).and_then(|parsed| match parsed {
        Parsed::Help => {
            print!("{USAGE}");
            Ok(())
        }
        Parsed::Run(invocation) => execute(&invocation, &mut prompt_terminal),
    });
    match result {
        Ok(()) => 0,
        Err(CliError::Usage) => {
            eprint!("{USAGE}");
            1
        }
        Err(e @ CliError::UnknownOption(_)) => {
            eprintln!("{e}\n");
            eprint!("{USAGE}");
            1
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

fn parse_args(args: &[OsString]) -> Result<Parsed, CliError> {
    let (mut batch, mut create, mut delete) = (false, false, false);
    let mut rest = args;
    // Options come first, as in mosquitto_passwd; letters may be combined (`-cb`).
    while let Some((arg, tail)) = rest.split_first() {
        let bytes = arg.as_bytes();
        if bytes == b"--" {
            rest = tail;
            break;
        }
        if bytes == b"-h" || bytes == b"--help" {
            return Ok(Parsed::Help);
        }
        if bytes.len() < 2 || bytes.first() != Some(&b'-') {
            break;
        }
        for &letter in bytes.get(1..).unwrap_or_default() {
            match letter {
                b'b' => batch = true,
                b'c' => create = true,
                b'D' => delete = true,
                _ => return Err(CliError::UnknownOption(arg.to_string_lossy().into_owned())),
            }
        }
        rest = tail;
    }
    if create && delete {
        return Err(CliError::CreateAndDelete);
    }
    if batch && delete {
        return Err(CliError::BatchAndDelete);
    }
    let (file, user, password) = match (batch, rest) {
        (true, [file, user, password]) => (file, user, Some(password)),
        (false, [file, user]) => (file, user, None),
        _ => return Err(CliError::Usage),
    };
    let user = valid_user(user)?;
    let change = match password {
        _ if delete => Change::Delete,
        Some(password) => Change::Set(Some(valid_password(password.as_bytes().to_vec())?)),
        None => Change::Set(None),
    };
    Ok(Parsed::Run(Invocation { create, file: PathBuf::from(file), user, change }))
}

/// A user name that reads back as itself from the file.
fn valid_user(user: &OsStr) -> Result<String, CliError> {
    let user = user.to_str().ok_or(CliError::BadUser("must be valid UTF-8"))?;
    let problem = if user.is_empty() {
        Some("must not be empty")
    } else if user.len() > MAX_FIELD_LEN {
        Some("must be less than 65536 characters long")
    } else if user.chars().any(char::is_control) {
        Some("must not contain control characters")
    } else if user.contains(':') {
        Some("must not contain the ':' character")
    } else if user.starts_with('#') {
        // The line would read as a comment.
        Some("must not start with '#'")
    } else if user.trim() != user {
        // Blanks around a user name are trimmed when the file is read.
        Some("must not start or end with blanks")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(CliError::BadUser(problem)),
        None => Ok(user.to_string()),
    }
}

fn valid_password(password: Vec<u8>) -> Result<Vec<u8>, CliError> {
    if password.len() > MAX_FIELD_LEN {
        return Err(CliError::PasswordTooLong);
    }
    Ok(password)
}

/// Carries out an invocation; `prompt` asks for a password when none was given.
fn execute(
    invocation: &Invocation,
    prompt: &mut dyn FnMut() -> Result<Vec<u8>, CliError>,
) -> Result<(), CliError> {
    let target = resolve(&invocation.file)?;
    let user = invocation.user.as_str();
    let mut password = |given: &Option<Vec<u8>>| match given {
        Some(password) => Ok(password.clone()),
        None => prompt(),
    };
    if invocation.create {
        let Change::Set(given) = &invocation.change else { return Err(CliError::CreateAndDelete) };
        let hash = PasswordHash::try_argon2id(&password(given)?)?;
        return write_atomically(&target, &format!("{user}:{}\n", hash.encode()));
    }
    let text = read_text(&target)?;
    // Edit only a file the broker would accept, so an edit never hides an older mistake.
    PasswordFile::parse(&text, &target)?;
    let new_text = match &invocation.change {
        Change::Delete => remove_user(&text, user).ok_or_else(|| CliError::UserNotFound(user.to_string()))?,
        Change::Set(given) => {
            let hash = PasswordHash::try_argon2id(&password(given)?)?;
            set_user(&text, user, &hash.encode())
        }
    };
    write_atomically(&target, &new_text)
}

/// The file to write: a symbolic link is followed (as mosquitto_passwd's `realpath`
/// does), so that the rename replaces the file and not the link.
fn resolve(path: &Path) -> Result<PathBuf, CliError> {
    match std::fs::canonicalize(path) {
        Ok(real) => Ok(real),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(path.to_path_buf()),
        Err(source) => Err(CliError::Open { path: path.to_path_buf(), source }),
    }
}

/// The line without its `\n` (a `\r` before it is left to [`split_line`]).
fn content(line: &str) -> &str {
    line.strip_suffix('\n').unwrap_or(line)
}

fn is_users_line(line: &str, user: &str) -> bool {
    matches!(split_line(content(line)), Ok(Line::Entry { user: u, .. }) if u == user)
}

/// `text` with the user's line replaced by `user:hash` (keeping its line ending), or the
/// line appended.
fn set_user(text: &str, user: &str, hash: &str) -> String {
    let mut out = String::with_capacity(text.len() + user.len() + hash.len() + 2);
    let mut found = false;
    for line in text.split_inclusive('\n') {
        if !found && is_users_line(line, user) {
            found = true;
            let ending = if line.ends_with("\r\n") {
                "\r\n"
            } else if line.ends_with('\n') {
                "\n"
            } else {
                ""
            };
            out.push_str(&format!("{user}:{hash}{ending}"));
        } else {
            out.push_str(line);
        }
    }
    if !found {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&format!("{user}:{hash}\n"));
    }
    out
}

/// `text` without the user's line, or `None` if the user is not listed.
fn remove_user(text: &str, user: &str) -> Option<String> {
    let mut found = false;
    let kept: String = text
        .split_inclusive('\n')
        .filter(|line| {
            let theirs = is_users_line(line, user);
            found |= theirs;
            !theirs
        })
        .collect();
    found.then_some(kept)
}

/// Distinguishes the temporary files of concurrent writers within one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `contents` to a new file beside `target` and renames it over `target`. A new
/// file gets mode 0600; a replaced one keeps its mode and (where allowed) its owner.
fn write_atomically(target: &Path, contents: &str) -> Result<(), CliError> {
    let write_error = |source: std::io::Error| CliError::Write { path: target.to_path_buf(), source };
    let name = target.file_name().ok_or_else(|| write_error(std::io::ErrorKind::InvalidInput.into()))?;
    let dir = match target.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut temp_name = OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(
        ".ringmq-tmp.{}.{}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let temp = dir.join(temp_name);
    let existing = std::fs::metadata(target).ok();
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp)?;
        if let Some(meta) = &existing {
            file.set_permissions(meta.permissions())?;
            // Keeps, say, a file root edits for the broker's user readable by it; only
            // root may give a file away, so elsewhere this fails and changes nothing.
            let _ = std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid()));
        }
        file.write_all(contents.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temp, target)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&temp);
        return Err(write_error(e));
    }
    // The rename is done; syncing the directory only makes it survive a power cut sooner.
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Asks for the password twice on the terminal (`/dev/tty`, else stdin and stderr),
/// with echo off.
fn prompt_terminal() -> Result<Vec<u8>, CliError> {
    match OpenOptions::new().read(true).write(true).open("/dev/tty") {
        Ok(tty) => {
            let _echo = EchoOff::new(tty.as_raw_fd());
            read_new_password(&mut BufReader::new(&tty), &mut &tty)
        }
        Err(_) => {
            let stdin = std::io::stdin();
            let _echo = EchoOff::new(stdin.as_raw_fd());
            read_new_password(&mut stdin.lock(), &mut std::io::stderr())
        }
    }
}

/// Reads a password and its confirmation, prompting on `out`.
fn read_new_password(input: &mut dyn BufRead, out: &mut dyn Write) -> Result<Vec<u8>, CliError> {
    let first = read_password(input, out, "Password: ")?;
    let second = read_password(input, out, "Reenter password: ")?;
    if first != second {
        return Err(CliError::PasswordsDiffer);
    }
    if first.is_empty() {
        return Err(CliError::EmptyPassword);
    }
    Ok(first)
}

fn read_password(input: &mut dyn BufRead, out: &mut dyn Write, prompt: &str) -> Result<Vec<u8>, CliError> {
    out.write_all(prompt.as_bytes()).and_then(|()| out.flush()).map_err(CliError::Prompt)?;
    let mut line = Vec::new();
    // Read one byte past the limit (and the line end) to tell a long password.
    let limit = MAX_FIELD_LEN as u64 + 3;
    let read = input.take(limit).read_until(b'\n', &mut line).map_err(CliError::Prompt)?;
    // With echo off the user's Enter was not shown.
    out.write_all(b"\n").and_then(|()| out.flush()).map_err(CliError::Prompt)?;
    if read == 0 {
        return Err(CliError::NoPassword);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    }
    valid_password(line)
}

/// The terminal whose echo is off, for the signal handler.
static ECHO_FD: AtomicI32 = AtomicI32::new(-1);

/// Signals that would end the process while echo is off.
const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Turns the terminal's echo back on, then dies of the signal as it would have.
extern "C" fn restore_echo_and_reraise(signal: libc::c_int) {
    let fd = ECHO_FD.load(Ordering::SeqCst);
    // SAFETY: tcgetattr, tcsetattr, signal and raise are async-signal-safe; `attrs` is a
    // plain C struct that tcgetattr fills.
    unsafe {
        let mut attrs: libc::termios = std::mem::zeroed();
        if fd >= 0 && libc::tcgetattr(fd, &mut attrs) == 0 {
            attrs.c_lflag |= libc::ECHO;
            libc::tcsetattr(fd, libc::TCSANOW, &attrs);
        }
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}

/// Echo off on a terminal until dropped, also if the user interrupts (Ctrl-C).
struct EchoOff {
    fd: RawFd,
    saved: libc::termios,
    handlers: [libc::sighandler_t; SIGNALS.len()],
}

impl EchoOff {
    /// `None` when `fd` is not a terminal (a pipe: nothing to hide).
    fn new(fd: RawFd) -> Option<EchoOff> {
        // SAFETY: `saved` is a plain C struct that tcgetattr fills on success.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        ECHO_FD.store(fd, Ordering::SeqCst);
        let handler = restore_echo_and_reraise as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: the handler only calls async-signal-safe functions.
        let handlers = SIGNALS.map(|signal| unsafe { libc::signal(signal, handler) });
        let mut quiet = saved;
        quiet.c_lflag &= !libc::ECHO;
        // SAFETY: `quiet` is a valid termios read from this terminal.
        unsafe { libc::tcsetattr(fd, libc::TCSAFLUSH, &quiet) };
        Some(EchoOff { fd, saved, handlers })
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        // SAFETY: restores what `new` read and replaced.
        unsafe {
            libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved);
            for (signal, handler) in SIGNALS.iter().zip(self.handlers) {
                libc::signal(*signal, handler);
            }
        }
        ECHO_FD.store(-1, Ordering::SeqCst);
    }
}
