//! The configuration file (`--config ringmq.toml`): every flag has a key of the same name
//! in snake case. The file is read into flags placed before those of the command line, so
//! one parser (clap) checks both, the command line wins, and a new flag is a new key with
//! nothing else to keep in step. Each key is checked on its own first, so an error names
//! the file, line and column.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use clap::{ArgAction, Command};
use std::any::TypeId;
use toml_edit::{ImDocument, Item, Value};

use super::{Listener, ListenerKind, TlsFiles};

/// A configuration file that cannot be used: where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid { path: PathBuf, line: usize, column: usize, message: String },
    #[error("{0}")]
    Flags(String),
}

/// Flags a key may not stand for: they are about reading the file itself, or act and exit.
const NOT_KEYS: &[&str] = &["help", "version", "config", "check_config", "example_config"];

/// The TOML type a flag's value takes in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Bool,
    Integer,
    Float,
    String,
}

impl KeyKind {
    fn of(arg: &clap::Arg) -> KeyKind {
        if matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
            return KeyKind::Bool;
        }
        let id = arg.get_value_parser().type_id();
        let integers = [
            TypeId::of::<usize>(),
            TypeId::of::<u64>(),
            TypeId::of::<u32>(),
            TypeId::of::<u16>(),
            TypeId::of::<u8>(),
            TypeId::of::<i64>(),
        ];
        if integers.iter().any(|t| id == *t) {
            KeyKind::Integer
        } else if id == TypeId::of::<f64>() {
            KeyKind::Float
        } else if id == TypeId::of::<bool>() {
            KeyKind::Bool
        } else {
            KeyKind::String
        }
    }

    fn name(self) -> &'static str {
        match self {
            KeyKind::Bool => "a boolean",
            KeyKind::Integer => "an integer",
            KeyKind::Float => "a number",
            KeyKind::String => "a string",
        }
    }
}

/// The flags a file may set: (key, its argument), in the order of `--help`.
pub fn keys(command: &Command) -> impl Iterator<Item = (String, &clap::Arg)> {
    command.get_arguments().filter(|a| !a.is_hide_set() && a.get_long().is_some()).filter_map(|arg| {
        let key = arg.get_long()?.replace('-', "_");
        (!NOT_KEYS.contains(&key.as_str())).then_some((key, arg))
    })
}

/// A configuration file read into flags.
#[derive(Debug, Default)]
pub struct FileArgs {
    /// `--flag=value` for every key, in the file's order.
    pub args: Vec<OsString>,
    /// The keys the file set.
    pub keys: Vec<String>,
    /// Its `[[listeners]]`.
    pub listeners: Vec<Listener>,
}

impl FileArgs {
    /// Reads `path` and checks every key against `command`'s flags: a key that is no flag,
    /// a value of the wrong TOML type, or one the flag's own parser refuses, is an error at
    /// its line and column.
    pub fn read(path: &Path, command: &Command) -> Result<FileArgs, ConfigFileError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigFileError::Read { path: path.to_path_buf(), source })?;
        FileArgs::parse(path, &text, command)
    }

    pub fn parse(path: &Path, text: &str, command: &Command) -> Result<FileArgs, ConfigFileError> {
        let invalid = |span: Option<Range<usize>>, message: String| {
            let (line, column) = line_column(text, span.map_or(0, |s| s.start));
            ConfigFileError::Invalid { path: path.to_path_buf(), line, column, message }
        };
        let doc = ImDocument::parse(text).map_err(|e| {
            let message = e.message().trim_end().to_string();
            invalid(e.span(), message)
        })?;
        let known: Vec<(String, &clap::Arg)> = keys(command).collect();
        let mut out = FileArgs::default();
        for (key, item) in doc.as_table().iter() {
            let key_span = doc.as_table().key(key).and_then(|k| k.span());
            if key == "listeners" {
                let Item::ArrayOfTables(tables) = item else {
                    return Err(invalid(
                        key_span,
                        "`listeners` must be an array of tables: `[[listeners]]`".into(),
                    ));
                };
                for table in tables.iter() {
                    out.listeners
                        .push(listener(table).map_err(|(span, m)| invalid(span.or(table.span()), m))?);
                }
                continue;
            }
            let Some((_, arg)) = known.iter().find(|(k, _)| k == key) else {
                return Err(invalid(key_span, format!("unknown key `{key}`")));
            };
            let long = arg.get_long().unwrap_or_default();
            let kind = KeyKind::of(arg);
            let Item::Value(value) = item else {
                return Err(invalid(key_span, format!("`{key}` must be {}, not a table", kind.name())));
            };
            let text_value = match (kind, value) {
                (KeyKind::Bool, Value::Boolean(b)) => b.value().to_string(),
                (KeyKind::Integer, Value::Integer(i)) => i.value().to_string(),
                (KeyKind::Float, Value::Float(f)) => f.value().to_string(),
                (KeyKind::Float, Value::Integer(i)) => i.value().to_string(),
                (KeyKind::String, Value::String(s)) => s.value().clone(),
                _ => {
                    return Err(invalid(
                        value.span(),
                        format!("`{key}` must be {}, not {}", kind.name(), value.type_name()),
                    ))
                }
            };
            let flag = if matches!(arg.get_action(), ArgAction::SetTrue) {
                // A switch: present or not.
                if text_value != "true" {
                    out.keys.push(key.to_string());
                    continue;
                }
                format!("--{long}")
            } else {
                format!("--{long}={text_value}")
            };
            // The flag's own parser decides what a valid value is, as on the command line.
            if let Err(err) = command.clone().try_get_matches_from([command.get_name(), flag.as_str()]) {
                let reason = err.to_string();
                let reason = reason.lines().next().unwrap_or_default().trim_start_matches("error: ");
                return Err(invalid(value.span(), format!("`{key}`: {reason}")));
            }
            out.args.push(flag.into());
            out.keys.push(key.to_string());
        }
        Ok(out)
    }
}

/// One `[[listeners]]` table; an error carries the span of what it is about.
fn listener(table: &toml_edit::Table) -> Result<Listener, (Option<Range<usize>>, String)> {
    let mut kind = None;
    let mut bind = None;
    let (mut cert, mut tls_key, mut ca, mut require) = (None, None, None, false);
    let mut out = Listener::tcp(SocketAddr::from(([0, 0, 0, 0], 1883)));
    for (key, item) in table.iter() {
        let key_span = table.key(key).and_then(|k| k.span());
        let value = item.as_value().ok_or((key_span.clone(), format!("listener `{key}` must be a value")))?;
        let wrong = |what: &str| {
            (value.span(), format!("listener `{key}` must be {what}, not {}", value.type_name()))
        };
        match key {
            "kind" => {
                let text = value.as_str().ok_or_else(|| wrong("a string"))?;
                kind = Some(match text {
                    "tcp" => ListenerKind::Tcp,
                    "tls" => ListenerKind::Tls,
                    "ws" => ListenerKind::Ws,
                    "wss" => ListenerKind::Wss,
                    other => {
                        return Err((
                            value.span(),
                            format!("listener kind `{other}`: one of tcp, tls, ws, wss"),
                        ))
                    }
                });
            }
            "bind" => {
                let text = value.as_str().ok_or_else(|| wrong("a string"))?;
                bind = Some(
                    text.parse::<SocketAddr>()
                        .map_err(|e| (value.span(), format!("listener `bind`: {e}")))?,
                );
            }
            "proxy_protocol" => out.proxy_protocol = value.as_bool().ok_or_else(|| wrong("a boolean"))?,
            "cert" | "key" | "ca" => {
                let path = PathBuf::from(value.as_str().ok_or_else(|| wrong("a string"))?);
                match key {
                    "cert" => cert = Some(path),
                    "key" => tls_key = Some(path),
                    _ => ca = Some(path),
                }
            }
            "require_client_cert" => require = value.as_bool().ok_or_else(|| wrong("a boolean"))?,
            "path" => {
                let path = value.as_str().ok_or_else(|| wrong("a string"))?;
                if !path.starts_with('/') {
                    return Err((value.span(), "listener `path` must start with `/`".to_string()));
                }
                out.path = path.to_string();
            }
            "allowed_origins" => {
                let list = value.as_array().ok_or_else(|| wrong("an array of strings"))?;
                out.allowed_origins = list
                    .iter()
                    .map(|o| {
                        o.as_str()
                            .map(str::to_string)
                            .ok_or((o.span(), "an origin must be a string".to_string()))
                    })
                    .collect::<Result<_, _>>()?;
            }
            "password_file" | "acl_file" | "jwt_key" => {
                let path = PathBuf::from(value.as_str().ok_or_else(|| wrong("a string"))?);
                match key {
                    "password_file" => out.auth.password_file = Some(path),
                    "acl_file" => out.auth.acl_file = Some(path),
                    _ => out.auth.jwt = Some(super::JwtKeySource::KeyFile(path)),
                }
            }
            "jwt_secret" => {
                let secret = value.as_str().ok_or_else(|| wrong("a string"))?;
                out.auth.jwt = Some(super::JwtKeySource::Secret(secret.to_string()));
            }
            "jwt_username_claim" => {
                out.auth.jwt_username_claim =
                    Some(value.as_str().ok_or_else(|| wrong("a string"))?.to_string());
            }
            "allow_anonymous" => {
                out.auth.allow_anonymous = Some(value.as_bool().ok_or_else(|| wrong("a boolean"))?);
            }
            "identity" => {
                let text = value.as_str().ok_or_else(|| wrong("a string"))?;
                out.auth.identity =
                    Some(text.parse().map_err(|e| (value.span(), format!("listener `identity`: {e}")))?);
            }
            "max_connections" => {
                let n = value.as_integer().ok_or_else(|| wrong("an integer"))?;
                out.max_connections = usize::try_from(n)
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or((value.span(), "listener `max_connections` must be at least 1".to_string()))?;
            }
            _ => return Err((key_span, format!("unknown listener key `{key}`"))),
        }
    }
    out.kind = kind.ok_or((None, "a listener needs `kind`".to_string()))?;
    out.bind = bind.ok_or((None, "a listener needs `bind`".to_string()))?;
    if !out.kind.is_websocket() && (out.path != super::DEFAULT_WS_PATH || !out.allowed_origins.is_empty()) {
        return Err((None, "`path` and `allowed_origins` are for ws and wss listeners".to_string()));
    }
    if !out.kind.is_tls() && out.auth.identity.is_some_and(|i| i != super::CertIdentityKind::None) {
        return Err((None, "`identity` is for tls and wss listeners (with `ca`)".to_string()));
    }
    match out.kind {
        ListenerKind::Tls | ListenerKind::Wss => {
            let (Some(cert), Some(key)) = (cert, tls_key) else {
                return Err((None, format!("a {} listener needs `cert` and `key`", out.kind)));
            };
            if require && ca.is_none() {
                return Err((None, "`require_client_cert` needs `ca`".to_string()));
            }
            out.tls = Some(TlsFiles { cert, key, ca, require_client_cert: require });
        }
        ListenerKind::Tcp | ListenerKind::Ws => {
            if cert.is_some() || tls_key.is_some() || ca.is_some() || require {
                return Err((
                    None,
                    "`cert`, `key`, `ca` and `require_client_cert` are for tls and wss listeners".into(),
                ));
            }
        }
    }
    Ok(out)
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Where an effective setting came from, for `--check-config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    CommandLine,
    File,
    Default,
}

/// The effective configuration as TOML a file could hold: every key with its value and
/// where it came from. `matches` are of the command line and file together; `from_cli`
/// tells which keys the command line set itself.
pub fn render_effective(
    command: &Command,
    matches: &clap::ArgMatches,
    file: &FileArgs,
    from_cli: impl Fn(&str) -> bool,
) -> String {
    let mut out = String::new();
    for (key, arg) in keys(command) {
        let id = arg.get_id().as_str();
        let kind = KeyKind::of(arg);
        let value = if matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
            Some(matches.get_flag(id).to_string())
        } else {
            matches.get_raw(id).and_then(|mut v| v.next()).map(|v| v.to_string_lossy().into_owned())
        };
        let source = if from_cli(id) {
            Source::CommandLine
        } else if file.keys.iter().any(|k| k == &key) {
            Source::File
        } else {
            Source::Default
        };
        let origin = match source {
            Source::CommandLine => "command line",
            Source::File => "file",
            Source::Default => "default",
        };
        match value {
            Some(v) => out.push_str(&format!("{key} = {}  # {origin}\n", toml_value(kind, &v))),
            None => out.push_str(&format!("# {key}: not set\n")),
        }
    }
    out
}

/// `text` as a TOML value of `kind`.
fn toml_value(kind: KeyKind, text: &str) -> String {
    match kind {
        KeyKind::Bool | KeyKind::Integer | KeyKind::Float
            if text.parse::<f64>().is_ok() || text == "true" || text == "false" =>
        {
            text.to_string()
        }
        _ => Value::from(text).to_string().trim().to_string(),
    }
}

/// The commented example file (`ringmq.example.toml`): every key with its help text and
/// default, commented out. Generated from the flags, so it cannot fall behind them (a test
/// compares the file in the repository with this).
pub fn example(command: &Command) -> String {
    let mut out = String::from(
        "# ringmq configuration file: `ringmq --config ringmq.toml`.\n\
         # Every command-line flag has a key of the same name in snake case; a flag given on\n\
         # the command line overrides the file. `ringmq --config F --check-config` validates\n\
         # the file and prints the effective configuration.\n\
         # Generated by `ringmq --example-config`; the values shown are the defaults.\n",
    );
    for (key, arg) in keys(command) {
        out.push('\n');
        let help = arg.get_long_help().or_else(|| arg.get_help()).map(|h| h.to_string()).unwrap_or_default();
        for line in help.lines() {
            wrap_comment(&mut out, line);
        }
        let kind = KeyKind::of(arg);
        let default = arg.get_default_values().first().map(|v| v.to_string_lossy().into_owned());
        let shown = match (kind, default) {
            (KeyKind::Bool, _) => "false".to_string(),
            (_, Some(v)) => toml_value(kind, &v),
            (KeyKind::Integer, None) => "4  # an example: no fixed default (see above)".to_string(),
            (_, None) => {
                format!("{}  # an example: not set by default", toml_value(kind, example_value(&key)))
            }
        };
        out.push_str(&format!("# {key} = {shown}\n"));
    }
    out.push_str(LISTENERS_EXAMPLE);
    out
}

/// A value to show for a key that has no default.
fn example_value(key: &str) -> &'static str {
    match key {
        "tls_bind" => "0.0.0.0:8883",
        "ws_bind" => "0.0.0.0:8083",
        "wss_bind" => "0.0.0.0:8084",
        "tls_cert" => "server.pem",
        "tls_key" => "server.key",
        "tls_ca" => "clients-ca.pem",
        "password_file" => "passwords",
        "acl_file" => "acl",
        "allow_anonymous" => "false",
        "tls_identity" => "cn",
        "jwt_secret" => "change-me",
        "jwt_key" => "jwt-public.pem",
        "jwt_username_claim" => "sub",
        "cluster" => "etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379",
        "node_name" => "node-a",
        "node_bind" => "10.0.0.11:7883",
        "node_advertise" => "10.0.0.11:7883",
        _ => "value",
    }
}

/// Appends `text` as `# ` comment lines of at most 90 columns.
fn wrap_comment(out: &mut String, text: &str) {
    let mut line = String::from("#");
    for word in text.split_whitespace() {
        if line.len() > 1 && line.len() + 1 + word.len() > 90 {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
}

/// The example's listener section.
const LISTENERS_EXAMPLE: &str = "
# Listeners: each is bound by every core (SO_REUSEPORT). With `[[listeners]]` in the file
# and no `bind` key or `--bind` flag, they replace the default tcp listener on `bind`.
#[[listeners]]
#kind = \"tcp\"              # tcp, tls, ws or wss
#bind = \"0.0.0.0:1884\"
#proxy_protocol = false    # a PROXY v1/v2 header (HAProxy, AWS NLB) comes before CONNECT (and TLS); its client address is used
#max_connections = 100000  # at once on this listener, all cores (--max-connections bounds the total)
#
# A TLS listener (TLS 1.2 and 1.3): PEM files of its certificate chain and key; with `ca`,
# client certificates are verified against it, and with `require_client_cert` a client
# without one is refused in the handshake.
#[[listeners]]
#kind = \"tls\"
#bind = \"0.0.0.0:8883\"
#cert = \"server.pem\"
#key = \"server.key\"
#ca = \"clients-ca.pem\"
#require_client_cert = false
#
# MQTT over WebSocket (ws://host:8083/mqtt; wss takes `cert`/`key`/`ca` like tls).
#[[listeners]]
#kind = \"ws\"
#bind = \"0.0.0.0:8083\"
#path = \"/mqtt\"
#allowed_origins = [\"https://app.example.com\"]  # empty or absent: any origin
#
# Any listener may carry its own authentication, in place of the flags' (which apply to
# every listener): e.g. anonymous on loopback, passwords and certificates in public.
#[[listeners]]
#kind = \"tls\"
#bind = \"0.0.0.0:8884\"
#cert = \"server.pem\"
#key = \"server.key\"
#ca = \"clients-ca.pem\"
#identity = \"cn\"               # cn, san or none: a verified certificate's name is the username
#password_file = \"passwords\"   # mosquitto_passwd / ringmq passwd format
#acl_file = \"acl\"              # Mosquitto acl_file syntax
#allow_anonymous = false
#jwt_key = \"jwt-public.pem\"     # or jwt_secret = \"...\" (HS256); jwt_username_claim = \"sub\"
";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Cli;
    use clap::CommandFactory;

    fn parse(text: &str) -> Result<FileArgs, ConfigFileError> {
        FileArgs::parse(Path::new("t.toml"), text, &Cli::command())
    }

    fn error_at(text: &str) -> (usize, usize, String) {
        match parse(text) {
            Err(ConfigFileError::Invalid { line, column, message, .. }) => (line, column, message),
            other => panic!("expected an error for {text:?}, got {other:?}"),
        }
    }

    /// Writes `text` to a file and loads it with `flags` after it on the command line.
    fn load(text: &str, flags: &[&str]) -> crate::config::Loaded {
        let dir =
            std::env::temp_dir().join(format!("ringmq-config-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ringmq.toml");
        std::fs::write(&path, text).unwrap();
        let mut args: Vec<OsString> = vec!["ringmq".into(), "--config".into(), path.clone().into()];
        args.extend(flags.iter().map(OsString::from));
        let loaded = Cli::load(args).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        loaded
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    #[test]
    fn every_key_of_the_example_is_accepted_with_its_default() {
        let command = Cli::command();
        let text = example(&command);
        let flags = &text[..text.find("[[listeners]]").unwrap()];
        let uncommented: String = flags
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')))
            .map(|l| format!("{}\n", l.split("  #").next().unwrap_or(l)))
            .collect();
        let file = parse(&uncommented).unwrap();
        let keys: Vec<String> = keys(&command).map(|(k, _)| k).collect();
        assert_eq!(file.keys, keys, "every flag is a key, in order");
        assert!(keys.len() > 40);
        assert!(keys.iter().any(|k| k == "max_inflight") && !keys.iter().any(|k| k == "config"));
    }

    #[test]
    fn the_examples_listener_and_listener_errors() {
        let text = example(&Cli::command());
        let first = &text[text.find("#[[listeners]]").unwrap()..];
        let sample: String = first[..first.find("#\n").unwrap()]
            .lines()
            .map(|l| format!("{}\n", l.trim_start_matches('#')))
            .collect();
        let file = parse(&sample).unwrap();
        assert_eq!(
            file.listeners,
            [Listener { max_connections: 100_000, ..Listener::tcp("0.0.0.0:1884".parse().unwrap()) }]
        );
        let two = parse("[[listeners]]\nkind = \"tcp\"\nbind = \"127.0.0.1:0\"\nproxy_protocol = true\n\n[[listeners]]\nkind = \"tcp\"\nbind = \"[::1]:1885\"\n").unwrap();
        assert_eq!(two.listeners.len(), 2);
        assert!(two.listeners[0].proxy_protocol && !two.listeners[1].proxy_protocol);
        assert_eq!(two.listeners[1].max_connections, usize::MAX);

        let (line, column, message) =
            error_at("[[listeners]]\nkind = \"tcp\"\nbind = \"127.0.0.1:1\"\nproxy = true\n");
        assert_eq!((line, column), (4, 1));
        assert!(message.contains("unknown listener key `proxy`"), "{message}");
        let (line, column, message) =
            error_at("[[listeners]]\nkind = \"carrier-pigeon\"\nbind = \"127.0.0.1:1\"\n");
        assert_eq!((line, column), (2, 8));
        assert!(message.contains("carrier-pigeon"), "{message}");
        assert!(error_at("[[listeners]]\nkind = \"tcp\"\n").2.contains("needs `bind`"));
        assert!(error_at("[[listeners]]\nkind = \"tcp\"\nbind = \"127.0.0.1:1\"\nmax_connections = 0\n")
            .2
            .contains("at least 1"));
        assert!(error_at("[[listeners]]\nkind = \"tcp\"\nbind = \"localhost\"\n")
            .2
            .contains("listener `bind`"));
        assert!(error_at("listeners = 3\n").2.contains("array of tables"));
        let ws = parse("[[listeners]]\nkind = \"wss\"\nbind = \"127.0.0.1:8084\"\ncert = \"a\"\nkey = \"b\"\npath = \"/ws\"\nallowed_origins = [\"https://x\"]\n").unwrap();
        assert_eq!((ws.listeners[0].kind, ws.listeners[0].path.as_str()), (ListenerKind::Wss, "/ws"));
        assert_eq!(ws.listeners[0].allowed_origins, ["https://x"]);
        assert!(error_at("[[listeners]]\nkind = \"wss\"\nbind = \"127.0.0.1:1\"\n")
            .2
            .contains("wss listener needs `cert`"));
        assert!(error_at("[[listeners]]\nkind = \"tcp\"\nbind = \"127.0.0.1:1\"\npath = \"/x\"\n")
            .2
            .contains("for ws and wss"));
        assert!(error_at("[[listeners]]\nkind = \"ws\"\nbind = \"127.0.0.1:1\"\npath = \"x\"\n")
            .2
            .contains("start with `/`"));
        assert!(error_at("[[listeners]]\nkind = \"ws\"\nbind = \"127.0.0.1:1\"\nallowed_origins = [1]\n")
            .2
            .contains("origin must be a string"));
    }

    #[test]
    fn listeners_in_the_file_replace_the_default_one_unless_bind_is_set() {
        let file = "[[listeners]]\nkind = \"tcp\"\nbind = \"127.0.0.1:1884\"\nproxy_protocol = true\n";
        let only = load(file, &[]);
        assert_eq!(only.listeners.len(), 1);
        assert_eq!(only.listeners[0].bind, "127.0.0.1:1884".parse().unwrap());
        assert!(only.effective.contains("[[listeners]]"), "{}", only.effective);
        let both = load(file, &["--bind", "127.0.0.1:1883"]);
        assert_eq!(both.listeners.iter().map(|l| l.bind.port()).collect::<Vec<_>>(), [1883, 1884]);
        let default = load("max_inflight = 3\n", &[]);
        assert_eq!(default.listeners, [Listener::tcp("0.0.0.0:1883".parse().unwrap())]);
    }

    #[test]
    fn the_example_file_in_the_repository_is_the_generated_one() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("ringmq.example.toml");
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == example(&Cli::command()),
            "ringmq.example.toml is out of date: `cargo run -- --example-config > ringmq.example.toml`"
        );
    }

    #[test]
    fn an_unknown_key_is_refused_at_its_line_and_column() {
        let (line, column, message) = error_at("max_inflight = 10\n  bogus_key = 1\n");
        assert_eq!((line, column), (2, 3));
        assert!(message.contains("unknown key `bogus_key`"), "{message}");
        // A hidden flag or one about the file itself is no key either.
        assert!(error_at("config = \"other.toml\"\n").2.contains("unknown key"));
        assert!(error_at("owner_of = \"x\"\n").2.contains("unknown key"));
    }

    #[test]
    fn a_value_of_the_wrong_type_is_refused_at_the_value() {
        let (line, column, message) = error_at("bind = \"127.0.0.1:1883\"\nmax_inflight = \"ten\"\n");
        assert_eq!((line, column), (2, 16));
        assert!(message.contains("`max_inflight` must be an integer, not string"), "{message}");
        let (line, _, message) = error_at("queue_qos0 = 1\n");
        assert_eq!(line, 1);
        assert!(message.contains("must be a boolean"), "{message}");
        assert!(error_at("max_inflight = 10\n[max_queued_bytes]\n").2.contains("not a table"));
        assert!(error_at("bind = 1883\n").2.contains("must be a string"));
    }

    #[test]
    fn a_value_the_flag_refuses_is_refused_with_the_flags_reason() {
        let (line, column, message) = error_at("\n\nmax_inflight = 0\n");
        assert_eq!((line, column), (3, 16));
        assert!(message.contains("max_inflight") && message.contains("between 1 and 65535"), "{message}");
        assert!(error_at("queue_full_policy = \"sometimes\"\n").2.contains("queue_full_policy"));
        assert!(error_at("bind = \"not an address\"\n").2.contains("bind"));
    }

    #[test]
    fn a_syntax_error_names_its_line_and_column() {
        let (line, column, _) = error_at("max_inflight = 10\nmax_queued_messages = = 3\n");
        assert_eq!(line, 2);
        assert!(column > 1);
    }

    #[test]
    fn the_command_line_overrides_the_file_and_check_config_says_where_each_came_from() {
        let file = "max_inflight = 9\nmax_queued_messages = 500\nqueue_qos0 = true\ncompact_below = 1\n";
        let loaded = load(file, &["--max-inflight", "7"]);
        assert_eq!(loaded.cli.max_inflight, 7);
        assert_eq!(loaded.cli.max_queued_messages, 500);
        assert!(loaded.cli.queue_qos0);
        assert_eq!(loaded.cli.compact_below, 1.0);
        let effective = &loaded.effective;
        assert!(effective.contains("max_inflight = 7  # command line\n"), "{effective}");
        assert!(effective.contains("max_queued_messages = 500  # file\n"), "{effective}");
        assert!(effective.contains("queue_qos0 = true  # file\n"), "{effective}");
        assert!(effective.contains("bind = \"0.0.0.0:1883\"  # default\n"), "{effective}");

        // The effective configuration is itself a valid file.
        let again: String =
            effective.lines().filter(|l| !l.starts_with('#')).map(|l| format!("{l}\n")).collect();
        let reloaded = load(&again, &[]);
        assert_eq!(reloaded.cli.max_inflight, 7);
        assert_eq!(reloaded.cli.max_queued_messages, 500);

        let switched_off = load("queue_qos0 = false\n", &[]);
        assert!(!switched_off.cli.queue_qos0);
        assert!(switched_off.effective.contains("queue_qos0 = false  # file\n"));
    }
}
