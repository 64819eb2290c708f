//! Access control lists in Mosquitto's `acl_file` syntax, compiled per client.
//!
//! [`Acl`] is the parsed file: immutable, shared by every shard behind an `Arc`. When a
//! client connects, [`Acl::for_client`] picks the rules that apply to it and compiles them
//! into a [`ClientAcl`] the connection owns: a level trie, so checking a PUBLISH walks the
//! topic's levels once, whatever the size of the file.
//!
//! # Syntax
//! One directive a line; leading and trailing blanks, blank lines and lines starting with
//! `#` are ignored (a `#` later in a line is part of it: filters end in `#`).
//! - `user NAME`: the `topic` lines that follow apply to clients with this username
//!   (NAME is the rest of the line, so it may contain spaces). Blocks of the same name
//!   add up.
//! - `topic [read|write|readwrite|deny] FILTER`: before the first `user` line, a rule for
//!   clients without a username; after it, for that user. The filter is the rest of the
//!   line. As in Mosquitto, a lone word is the filter (`topic read` grants `readwrite` on
//!   the topic `read`), and of two or more words the first must be an access word.
//! - `pattern [read|write|readwrite|deny] FILTER`: a rule for every client, wherever it
//!   appears. A level that is exactly `%c` stands for the client id and one that is
//!   exactly `%u` for the username; elsewhere `%c`/`%u` are literal text.
//!
//! # Semantics
//! - A `deny` rule refuses every topic it matches, whatever else is granted.
//! - Otherwise a topic is allowed if a rule with the access needed matches it (`read` for
//!   delivering and subscribing, `write` for publishing); nothing matched is refused.
//! - A topic starting with `$` is matched only by filters that start with `$` (the
//!   MQTT-4.7.2-1 rule), so `topic #` grants nothing under `$SYS`.
//! - Publishing to `$SYS` is refused whatever the rules.
//! - A pattern using `%c` is skipped for a client whose id contains `+`, `#` or `/`, and one
//!   using `%u` for a client whose username does (or who has none): substituted, such a
//!   name would widen the rule to other clients' topics.

use std::path::{Path, PathBuf};

use ahash::AHashMap;

use crate::topic::TopicFilter;

mod matcher;
mod relation;
#[cfg(test)]
mod tests;

pub use matcher::ClientAcl;

/// Access bits of a rule. `DENY` is checked before the others.
const READ: u8 = 1;
const WRITE: u8 = 2;
const DENY: u8 = 4;

/// Why an ACL file was refused: where, and what is wrong there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {reason}", path.display())]
pub struct AclError {
    pub path: PathBuf,
    /// 1-based; 0 when the file as a whole could not be read.
    pub line: usize,
    pub reason: String,
}

/// What a SUBSCRIBE may get, decided from its filter alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeVerdict {
    /// Every topic the filter matches may be read: deliver without further checks.
    Allowed,
    /// Some topics may be read and some may not: check each delivery with
    /// [`ClientAcl::can_read`].
    Filtered,
    /// Nothing the filter matches may be read.
    Denied,
}

/// One `topic` line: a filter as written, and its access bits.
#[derive(Debug, Clone)]
struct Rule {
    filter: Box<str>,
    access: u8,
}

/// One `pattern` line, with which placeholders it uses (so a client they cannot be
/// substituted for skips it without scanning the filter).
#[derive(Debug, Clone)]
struct Pattern {
    filter: Box<str>,
    access: u8,
    client_id: bool,
    username: bool,
}

/// A parsed ACL file.
///
/// Invariant: every filter is a valid [`TopicFilter`]; substituting a name without `+`,
/// `#` or `/` for a whole `%c`/`%u` level keeps a pattern valid.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    /// The `topic` lines before the first `user` line.
    anonymous: Vec<Rule>,
    /// The `topic` lines of each user, so a client's rules are found without reading the
    /// other users' (AHash's random seed is fine: the map is never persisted).
    users: AHashMap<Box<str>, Vec<Rule>>,
    patterns: Vec<Pattern>,
    rule_count: usize,
}

/// Mosquitto separates words with blanks; tabs are taken too.
fn trim(text: &str) -> &str {
    text.trim_matches(|c: char| c.is_ascii_whitespace())
}

/// The first word of `text` (already trimmed) and the trimmed rest.
fn split_word(text: &str) -> (&str, &str) {
    match text.split_once(|c: char| c.is_ascii_whitespace()) {
        Some((word, rest)) => (word, trim(rest)),
        None => (text, ""),
    }
}

fn access_bits(word: &str) -> Option<u8> {
    match word {
        "read" => Some(READ),
        "write" => Some(WRITE),
        "readwrite" => Some(READ | WRITE),
        "deny" => Some(DENY),
        _ => None,
    }
}

/// The access bits and the filter of a `topic` or `pattern` line, after its keyword.
fn parse_rule<'a>(keyword: &str, rest: &'a str) -> Result<(u8, &'a str), String> {
    if rest.is_empty() {
        return Err(format!("`{keyword}` without a filter"));
    }
    let (first, tail) = split_word(rest);
    let (access, filter) = if tail.is_empty() {
        (READ | WRITE, first)
    } else {
        let access = access_bits(first)
            .ok_or_else(|| format!("unknown access {first:?} (expected read, write, readwrite or deny)"))?;
        (access, tail)
    };
    TopicFilter::new(filter.to_owned()).map_err(|e| format!("invalid filter {filter:?}: {e}"))?;
    Ok((access, filter))
}

impl Acl {
    /// Parses the text of an ACL file; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Acl, AclError> {
        let mut acl = Acl::default();
        // The user whose block `topic` lines go to; `None` before the first `user` line.
        let mut user: Option<Box<str>> = None;
        for (index, raw) in text.lines().enumerate() {
            let error = |reason: String| AclError { path: path.to_path_buf(), line: index + 1, reason };
            let line = trim(raw);
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (keyword, rest) = split_word(line);
            match keyword {
                "user" if rest.is_empty() => return Err(error("`user` without a name".to_owned())),
                "user" => {
                    acl.users.entry(rest.into()).or_default();
                    user = Some(rest.into());
                }
                "topic" => {
                    let (access, filter) = parse_rule(keyword, rest).map_err(error)?;
                    let rules = match &user {
                        None => &mut acl.anonymous,
                        Some(name) => acl.users.entry(name.clone()).or_default(),
                    };
                    rules.push(Rule { filter: filter.into(), access });
                    acl.rule_count += 1;
                }
                "pattern" => {
                    let (access, filter) = parse_rule(keyword, rest).map_err(error)?;
                    let uses = |placeholder| filter.split('/').any(|level| level == placeholder);
                    acl.patterns.push(Pattern {
                        filter: filter.into(),
                        access,
                        client_id: uses("%c"),
                        username: uses("%u"),
                    });
                    acl.rule_count += 1;
                }
                other => {
                    return Err(error(format!("unknown keyword {other:?} (expected user, topic or pattern)")))
                }
            }
        }
        Ok(acl)
    }

    /// Reads and parses the ACL file at `path`. An unreadable file is an error at line 0.
    pub fn load(path: &Path) -> Result<Acl, AclError> {
        let bytes = std::fs::read(path).map_err(|e| AclError {
            path: path.to_path_buf(),
            line: 0,
            reason: e.to_string(),
        })?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let good = e.as_bytes().get(..e.utf8_error().valid_up_to()).unwrap_or_default();
            let line = 1 + good.iter().filter(|b| **b == b'\n').count();
            AclError { path: path.to_path_buf(), line, reason: "not valid UTF-8".to_owned() }
        })?;
        Acl::parse(&text, path)
    }

    /// Number of `topic` and `pattern` lines.
    pub fn rule_count(&self) -> usize {
        self.rule_count
    }

    /// The rules that apply to one client, with `%c`/`%u` substituted, compiled for
    /// matching. Reads the client's own block (or the anonymous one) and the patterns,
    /// never the other users' blocks.
    pub fn for_client(&self, client_id: &str, username: Option<&str>) -> ClientAcl {
        // An empty username is none (the anonymous block, no `users//...` pattern).
        let username = username.filter(|name| !name.is_empty());
        let block: &[Rule] = match username {
            None => &self.anonymous,
            Some(name) => self.users.get(name).map_or(&[], Vec::as_slice),
        };
        // A name with a separator or a wildcard, substituted, would be more than one level
        // or a wildcard: the rule would reach other clients' topics; one starting with `$`
        // would reach the broker's (`pattern read %c/#` for client `$SYS`).
        let plain = |name: &str| !name.contains(['+', '#', '/']) && !name.starts_with('$');
        let id_ok = plain(client_id);
        let user_ok = username.is_some_and(plain);
        let patterns = self.patterns.iter().filter(|p| (id_ok || !p.client_id) && (user_ok || !p.username));

        let names = client_id.len() + username.map_or(0, str::len);
        let bytes = block.iter().map(|r| r.filter.len()).sum::<usize>()
            + self.patterns.iter().map(|p| p.filter.len() + names).sum::<usize>();
        let mut builder = matcher::Builder::with_capacity(block.len() + self.patterns.len(), bytes);
        for rule in block {
            builder.push(&rule.filter, rule.access);
        }
        for pattern in patterns {
            builder.push_pattern(&pattern.filter, pattern.access, client_id, username.unwrap_or(""));
        }
        builder.finish()
    }
}
