//! The dependency rule, checked: `server` → `connection`/`mesh` (I/O) → `shard` →
//! components → `storage` → `session` → `message`/`codec`/`topic`. Nothing below imports
//! anything above. Each rule lists what a group of files must not mention.

use std::path::{Path, PathBuf};

/// (files under `src/`, words they must not contain in code).
const RULES: &[(&str, &[&str])] = &[
    ("codec", &["broker::", "storage::", "server::", "glommio"]),
    ("auth", &["broker::", "storage::", "server::", "listener::", "connection::"]),
    ("topic", &["broker::", "storage::", "server::", "glommio"]),
    (
        "broker/session",
        &[
            "connection::",
            "conn_handle::",
            "shard::",
            "mesh::",
            "cross::",
            "admin::",
            "storage::",
            "server::",
            "glommio",
            "Instant::now",
        ],
    ),
    ("broker/message.rs", &["session::", "shard::", "connection::", "mesh::", "storage::", "glommio"]),
    ("storage", &["shard::", "connection::", "mesh::", "conn_handle::", "cross::", "server::", "glommio"]),
    ("broker/conn_handle.rs", &["shard::", "connection::", "mesh::", "storage::", "server::", "glommio"]),
    ("broker/cross.rs", &["shard::", "connection::", "mesh::", "server::", "glommio"]),
    ("broker/shared.rs", &["shard::", "connection::", "mesh::", "server::", "glommio"]),
    ("broker/sys.rs", &["shard::", "connection::", "mesh::", "server::", "glommio"]),
    ("broker/shard", &["connection::", "mesh::", "server::"]),
    ("broker/admin.rs", &["shard::", "connection::", "mesh::", "server::", "http::", "glommio"]),
    ("broker/core_counters.rs", &["shard::", "connection::", "session::", "server::", "http::", "glommio"]),
    ("http/request.rs", &["broker::", "server::", "glommio"]),
    ("cluster", &["broker::", "storage::", "server::", "http::", "glommio", "Instant::now"]),
    ("node/handshake.rs", &["broker::", "shard::", "server::", "glommio"]),
    ("node/frame", &["shard::", "connection::", "mesh::", "server::", "glommio", "Instant::now"]),
    ("node/bridge", &["shard::", "connection::", "mesh::", "server::", "glommio", "Instant::now"]),
    ("node", &["shard::", "connection::", "server::", "http::"]),
    ("http/metrics.rs", &["shard::", "connection::", "server::", "glommio"]),
];

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_file() {
        out.push(path.to_path_buf());
        return;
    }
    let Ok(entries) = std::fs::read_dir(path) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() || path.extension().is_some_and(|e| e == "rs") {
            rust_files(&path, out);
        }
    }
}

/// The code of a file: comments dropped, and `#[cfg(test)]` modules at its end (tests
/// may build any surroundings they need).
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines().map(|line| line.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

#[test]
fn dependencies_point_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut violations = Vec::new();
    for (place, forbidden) in RULES {
        let mut files = Vec::new();
        rust_files(&src.join(place), &mut files);
        assert!(!files.is_empty(), "no files under src/{place}");
        for file in files {
            if file.file_name().is_some_and(|n| n == "tests.rs")
                || file.components().any(|c| c.as_os_str() == "tests")
            {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            let code = code(&text);
            for word in *forbidden {
                if code.contains(word) {
                    violations.push(format!("{} mentions `{word}`", file.display()));
                }
            }
        }
    }
    assert!(violations.is_empty(), "dependency rule broken:\n{}", violations.join("\n"));
}

#[test]
fn no_source_file_exceeds_800_lines() {
    let mut files = Vec::new();
    rust_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let lines = std::fs::read_to_string(f).ok()?.lines().count();
            (lines > 800).then(|| format!("{}: {lines} lines", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "files over 800 lines:\n{}", long.join("\n"));
}
