use super::*;

// Written by Mosquitto 2.0.11's mosquitto_passwd (`-c -b FILE USER PASSWORD`, with
// `-H sha512` for `$6$`, `-I 1000` for erin).
const ALICE_PBKDF2: &str = "alice:$7$101$xXs2tAVTP+W+7SYL$VIg232tirEoRNNqvDwObl+eBV0ZQMkTqWtWr5DeY8c04qw/8FKUMbUApb/O1SUJXCiL/lIlI1fs9GKuQkCVS4w==";
const BOB_SHA512: &str = "bob:$6$K1ZS9BgpRhN13Qq7$jryIplq1LCSWo8v5qBebVC5Rd0/7MHZ4VcyP4aUWPD0cTAi03HSM9I/yThvEiFtU2VFNXvknjPz6XOa/6Q0+Sg==";
/// Password `pa:ss wörd`.
const CAROL_PBKDF2: &str = "carol:$7$101$vIg8EkJXTloUMAYD$BPk+cq+IPi2juRrBNiLU1/knth5AN7ZsfB6kLG5gaoKmckMHGi8SamvXcrTjbAc+IeJqxrhPm/gSkQaeaxnpnw==";
/// Empty password.
const DAVE_SHA512: &str = "dave:$6$itRW/gv2WR72hQHG$vSMwiE3si67AW66NvgEjMGnXAKf2/rdF5cb2ntvmFm3O5TxZF5hVfGStKYCjXGkbyGh+i4Pkgq9yBfJ+JIxZNQ==";
/// Password `hunter2`, 1000 iterations.
const ERIN_PBKDF2: &str = "erin:$7$1000$6yFLFr9GqEH7GxUg$R3rYu43Yu4PYCDuJEo+/wwPWp9cJHlUX2rPK7PvFBWmdpd0bJ/2q1uzdPwcVd0pY3yFgw1FgD8F4NdK5m8NfvQ==";

// Written by the reference implementation's `argon2` tool (Debian's package):
// `echo -n secret | argon2 ringmqsaltsalt -id -t 1 -m 6 -p 1 -e`, and variants.
const ARGON2ID_SECRET: &str =
    "$argon2id$v=19$m=64,t=1,p=1$cmluZ21xc2FsdHNhbHQ$TFzXu8xX9VNnzxyDOh8yo2HK/br9U0Ubhxdq/R4pIzI";
/// Version 0x10 (`-v 10`), password `secret`.
const ARGON2ID_V16_SECRET: &str =
    "$argon2id$v=16$m=64,t=1,p=1$cmluZ21xc2FsdHNhbHQ$jL3dyKd2iUD2VdX/jmfn+HvkcNzptyCuK5AzQyTLEjY";
/// Two lanes, three passes, password `pa:ss wörd`.
const ARGON2ID_LANES: &str =
    "$argon2id$v=19$m=128,t=3,p=2$YW5vdGhlcnNhbHQxMjM$/noAnwov+bK9Kq0fVIsN/hfsiukSb8plnpEZ+kAi+ik";
const ARGON2I_SECRET: &str =
    "$argon2i$v=19$m=64,t=1,p=1$cmluZ21xc2FsdHNhbHQ$Tfog+cY0rbj2L4Ejh3aOTxbKauKY4n80OfHeKbCdcFM";

fn path() -> &'static Path {
    Path::new("/etc/ringmq/passwd")
}

fn parse(text: &str) -> Result<PasswordFile, PasswordFileError> {
    PasswordFile::parse(text, path())
}

fn hash(text: &str) -> PasswordHash {
    match text.parse() {
        Ok(hash) => hash,
        Err(e) => panic!("{text}: {e}"),
    }
}

/// The reason a one-entry file `u:<hash>` is refused.
fn hash_error(hash_text: &str) -> LineError {
    match parse(&format!("u:{hash_text}\n")) {
        Err(PasswordFileError::Malformed { line: 1, reason, .. }) => reason,
        other => panic!("{hash_text}: {other:?}"),
    }
}

#[test]
fn mosquitto_files_verify() {
    let text = [ALICE_PBKDF2, BOB_SHA512, CAROL_PBKDF2, DAVE_SHA512, ERIN_PBKDF2].join("\n") + "\n";
    let file = parse(&text).unwrap();
    assert_eq!(file.len(), 5);
    assert!(file.check("alice", b"secret"));
    assert!(!file.check("alice", b"Secret"));
    assert!(!file.check("alice", b"secret\n"));
    assert!(file.check("bob", b"secret"));
    assert!(!file.check("bob", b"secre"));
    assert!(file.check("carol", "pa:ss wörd".as_bytes()));
    assert!(!file.check("carol", b"pa"));
    assert!(file.check("dave", b""));
    assert!(!file.check("dave", b" "));
    assert!(file.check("erin", b"hunter2"));
    assert!(!file.check("erin", b"secret"));
    assert!(!file.check("mallory", b"secret"));
    // A user's password does not open another user's entry.
    assert!(!file.check("bob", "pa:ss wörd".as_bytes()));
    assert!(matches!(file.get("erin"), Some(PasswordHash::Pbkdf2Sha512(h)) if h.iterations() == 1000));
    assert!(matches!(file.get("bob"), Some(PasswordHash::Sha512(_))));
}

#[test]
fn reference_argon2id_hashes_verify() {
    assert!(hash(ARGON2ID_SECRET).verify(b"secret"));
    assert!(!hash(ARGON2ID_SECRET).verify(b"secreT"));
    assert!(hash(ARGON2ID_V16_SECRET).verify(b"secret"));
    assert!(!hash(ARGON2ID_V16_SECRET).verify(b"secrets"));
    let lanes = hash(ARGON2ID_LANES);
    assert!(lanes.verify("pa:ss wörd".as_bytes()));
    assert!(!lanes.verify(b"secret"));
    assert!(matches!(&lanes, PasswordHash::Argon2id(h) if h.cost() == (128, 3, 2)));
}

#[test]
fn new_argon2id_hashes_verify_and_round_trip() {
    let a = PasswordHash::argon2id(b"correct horse");
    let b = PasswordHash::argon2id(b"correct horse");
    assert!(a.verify(b"correct horse"));
    assert!(!a.verify(b"correct horse "));
    assert!(!a.verify(b""));
    // Fresh salts: the same password hashes differently.
    assert_ne!(a.encode(), b.encode());
    let text = a.encode();
    assert!(text.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{text}");
    let back = hash(&text);
    assert_eq!(back.encode(), text);
    assert!(back.verify(b"correct horse"));
    assert!(!back.verify(b"correct horsf"));
    let file = parse(&format!("carol:{text}\n")).unwrap();
    assert!(file.check("carol", b"correct horse"));
    assert!(!file.check("carol", b"wrong"));
}

#[test]
fn encode_round_trips_every_kind() {
    for line in [ALICE_PBKDF2, BOB_SHA512, ERIN_PBKDF2] {
        let (_, text) = line.split_once(':').unwrap();
        // Mosquitto pads its base64, and so does encode: the text comes back unchanged.
        assert_eq!(hash(text).encode(), text);
    }
    for text in [ARGON2ID_SECRET, ARGON2ID_V16_SECRET, ARGON2ID_LANES] {
        assert_eq!(hash(text).encode(), text);
    }
    // Unpadded base64 is read too; it is written back padded and still verifies.
    let unpadded = "$6$K1ZS9BgpRhN13Qq7$jryIplq1LCSWo8v5qBebVC5Rd0/7MHZ4VcyP4aUWPD0cTAi03HSM9I/yThvEiFtU2VFNXvknjPz6XOa/6Q0+Sg";
    let h = hash(unpadded);
    assert!(h.verify(b"secret"));
    assert_eq!(h.encode(), format!("{unpadded}=="));
}

#[test]
fn comments_blank_lines_blanks_and_crlf_are_accepted() {
    let text = format!(
        "# users\n\n   \n  # indented comment\n{ALICE_PBKDF2}\r\n  {}\t\n{ERIN_PBKDF2}",
        BOB_SHA512.replacen(':', " : ", 1)
    );
    let file = parse(&text).unwrap();
    assert_eq!(file.len(), 3);
    assert!(file.check("alice", b"secret"));
    assert!(file.check("bob", b"secret"));
    assert!(file.check("erin", b"hunter2"));
    assert!(file.get("bob ").is_none());
}

#[test]
fn empty_file_has_no_users() {
    for text in ["", "\n", "# nothing\n\n"] {
        let file = parse(text).unwrap();
        assert!(file.is_empty());
        assert_eq!(file.len(), 0);
        assert!(!file.check("alice", b"secret"));
        assert!(!file.check("", b""));
    }
}

#[test]
fn malformed_lines_name_path_line_and_reason() {
    let cases: &[(&str, usize, LineError)] = &[
        ("alice\n", 1, LineError::NoColon),
        ("# c\n\n:$6$K1ZS9BgpRhN13Qq7$abc\n", 3, LineError::EmptyUser),
        ("a\u{7}b:$6$x$y\n", 1, LineError::UserControl),
        ("bob:\n", 1, LineError::Hash(HashError::Empty)),
        ("bob:secret\n", 1, LineError::Hash(HashError::UnknownFormat)),
        ("bob:$5$abc$def\n", 1, LineError::Hash(HashError::UnknownFormat)),
    ];
    for (text, line, reason) in cases {
        match parse(&format!("{ALICE_PBKDF2}\n{text}")) {
            Err(PasswordFileError::Malformed { path: p, line: l, reason: r }) => {
                assert_eq!((p.as_path(), l, &r), (path(), line + 1, reason), "{text:?}");
            }
            other => panic!("{text:?}: {other:?}"),
        }
    }
    let e = parse(&format!("{ALICE_PBKDF2}\nbob:$6$!!$x\n")).unwrap_err();
    assert_eq!(e.to_string(), "/etc/ringmq/passwd:2: salt is not valid base64");
}

#[test]
fn bad_hash_fields_are_refused() {
    let salt = "xXs2tAVTP+W+7SYL";
    let sha = "VIg232tirEoRNNqvDwObl+eBV0ZQMkTqWtWr5DeY8c04qw/8FKUMbUApb/O1SUJXCiL/lIlI1fs9GKuQkCVS4w==";
    let h = |e| LineError::Hash(e);
    assert_eq!(hash_error(&format!("$7$101${salt}")), h(HashError::FieldCount { expected: 3 }));
    assert_eq!(hash_error(&format!("$7$101${salt}${sha}$")), h(HashError::FieldCount { expected: 3 }));
    assert_eq!(hash_error(&format!("$6${salt}")), h(HashError::FieldCount { expected: 2 }));
    for iterations in ["0", "+5", "-1", "", "1e3", "4294967296", "1000001"] {
        assert_eq!(
            hash_error(&format!("$7${iterations}${salt}${sha}")),
            h(HashError::Iterations(iterations.into())),
            "{iterations}"
        );
    }
    assert_eq!(hash_error(&format!("$7$101$${sha}")), h(HashError::SaltLength(0)));
    let long_salt = STANDARD.encode([7u8; MAX_SALT_LEN + 1]);
    assert_eq!(hash_error(&format!("$6${long_salt}${sha}")), h(HashError::SaltLength(65)));
    assert_eq!(hash_error(&format!("$6${salt}$c2hvcnQ=")), h(HashError::HashLength(5)));
    assert_eq!(hash_error(&format!("$6${salt}${sha}:extra")), h(HashError::Base64 { field: "hash" }));
    assert_eq!(hash_error(ARGON2I_SECRET), h(HashError::Argon2Variant("argon2i".into())));
    assert!(matches!(hash_error("$argon2id$v=19$m=64,t=1,p=1"), LineError::Hash(HashError::Argon2(_))));
    assert!(matches!(
        hash_error(
            "$argon2id$v=18$m=64,t=1,p=1$cmluZ21xc2FsdHNhbHQ$TFzXu8xX9VNnzxyDOh8yo2HK/br9U0Ubhxdq/R4pIzI"
        ),
        LineError::Hash(HashError::Argon2(_))
    ));
    // A 4-byte salt is valid PHC but below argon2's minimum of 8.
    assert_eq!(
        hash_error("$argon2id$v=19$m=64,t=1,p=1$c2FsdA$TFzXu8xX9VNnzxyDOh8yo2HK/br9U0Ubhxdq/R4pIzI"),
        h(HashError::SaltLength(4))
    );
}

#[test]
fn costly_hashes_are_refused() {
    let tail = "cmluZ21xc2FsdHNhbHQ$TFzXu8xX9VNnzxyDOh8yo2HK/br9U0Ubhxdq/R4pIzI";
    let refused = [(65_537, 1, 1), (65_536, 5, 1), (4096, 65, 1), (256, 1, 17), (8, 4_000_000, 1)];
    for (m, t, p) in refused {
        assert_eq!(
            hash_error(&format!("$argon2id$v=19$m={m},t={t},p={p}${tail}")),
            LineError::Hash(HashError::Argon2Cost { m_cost: m, t_cost: t, p_cost: p }),
            "m={m},t={t},p={p}"
        );
    }
    // At the bounds: accepted (not verified here, which would take a while).
    for (m, t, p) in [(65_536, 4, 1), (128, 1, 16), (4096, 64, 1)] {
        assert!(parse(&format!("u:$argon2id$v=19$m={m},t={t},p={p}${tail}\n")).is_ok(), "m={m},t={t},p={p}");
    }
    let salt = "xXs2tAVTP+W+7SYL";
    let sha = "VIg232tirEoRNNqvDwObl+eBV0ZQMkTqWtWr5DeY8c04qw/8FKUMbUApb/O1SUJXCiL/lIlI1fs9GKuQkCVS4w==";
    assert!(parse(&format!("u:$7${MAX_PBKDF2_ITERATIONS}${salt}${sha}\n")).is_ok());
}

#[test]
fn long_lines_and_user_names_are_refused() {
    let long = format!("{}:{}", "u".repeat(MAX_LINE_LEN), &ALICE_PBKDF2[6..]);
    assert!(matches!(parse(&long), Err(PasswordFileError::Malformed { reason: LineError::TooLong, .. })));
    let comment = format!("#{}\n", "c".repeat(MAX_LINE_LEN));
    assert!(matches!(parse(&comment), Err(PasswordFileError::Malformed { reason: LineError::TooLong, .. })));
    let user = "u".repeat(MAX_USER_LEN + 1);
    let line = format!("{user}:$6$x$y");
    assert!(matches!(parse(&line), Err(PasswordFileError::Malformed { reason: LineError::UserTooLong, .. })));
    // The longest MQTT user name fits.
    let user = "u".repeat(MAX_USER_LEN);
    let file = parse(&format!("{user}:{}\n", &BOB_SHA512[4..])).unwrap();
    assert!(file.check(&user, b"secret"));
}

#[test]
fn duplicate_users_refuse_the_file() {
    // Two users written separately by mosquitto_passwd, passwords `one` and `two`.
    let text = "alice:$7$101$jT+lF0tpkoNj2uqU$OAGG+zKx2bKVkTKi85FivdFZ62XfGM+Yu0AEFjjxzF/b1P7tfqcuoyHxXJUErQV393fplEOwAC3tdqv0moaX4g==\n\
                # again\n\
                 alice :$7$101$QcsvFnWQA8OrTEDy$mniQwVfK6MnKIXmxyCmpkF2bnB9jHJ+lWMMFWDH9hrPCfvI0/lv7sXAF3Pa0X29MINqZzeRFl2cj18WzXCuMCw==\n";
    match parse(text) {
        Err(e @ PasswordFileError::DuplicateUser { line: 3, first: 1, .. }) => {
            assert_eq!(e.to_string(), "/etc/ringmq/passwd:3: user \"alice\" is already listed on line 1");
        }
        other => panic!("{other:?}"),
    }
    // Different users with one hash are fine.
    let text = format!("{ALICE_PBKDF2}\n{}\n", ALICE_PBKDF2.replacen("alice", "alice2", 1));
    assert_eq!(parse(&text).unwrap().len(), 2);
}

#[test]
fn load_reads_files_and_reports_io_and_utf8_errors() {
    let dir = std::env::temp_dir().join(format!("ringmq-passwd-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good");
    std::fs::write(&good, format!("{ALICE_PBKDF2}\n{BOB_SHA512}\n")).unwrap();
    let file = PasswordFile::load(&good).unwrap();
    assert!(file.check("alice", b"secret") && file.check("bob", b"secret"));

    let missing = dir.join("missing");
    match PasswordFile::load(&missing) {
        Err(PasswordFileError::Io { path, source }) => {
            assert_eq!(path, missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }

    let latin1 = dir.join("latin1");
    std::fs::write(&latin1, [ALICE_PBKDF2.as_bytes(), b"\n# caf\xe9\n"].concat()).unwrap();
    match PasswordFile::load(&latin1) {
        Err(PasswordFileError::Malformed { path, line: 2, reason: LineError::NotUtf8 }) => {
            assert_eq!(path, latin1)
        }
        other => panic!("{other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unknown_users_are_checked_against_the_most_common_kind() {
    let text = format!(
        "{ALICE_PBKDF2}\n{BOB_SHA512}\n{CAROL_PBKDF2}\n{}\n",
        ERIN_PBKDF2.replacen("erin", "frank", 1)
    );
    let file = parse(&text).unwrap();
    // alice and carol share `$7$` at 101 iterations: the largest group, first seen first.
    assert!(matches!(&file.dummy, Some(PasswordHash::Pbkdf2Sha512(h)) if h.iterations() == 101));
    let file = parse(&format!("{BOB_SHA512}\n{ALICE_PBKDF2}\n")).unwrap();
    assert!(matches!(&file.dummy, Some(PasswordHash::Sha512(_))));
    // The dummy never lets an unknown user in, even with a listed user's password.
    assert!(!file.check("nobody", b"secret"));
    assert!(parse("").unwrap().dummy.is_none());
}

#[test]
fn split_line_classifies() {
    assert_eq!(split_line(""), Ok(Line::Ignored));
    assert_eq!(split_line("\r"), Ok(Line::Ignored));
    assert_eq!(split_line(" #x:y"), Ok(Line::Ignored));
    assert_eq!(split_line(" u : h \r"), Ok(Line::Entry { user: "u", hash: "h" }));
    assert_eq!(split_line("u:h:i"), Ok(Line::Entry { user: "u", hash: "h:i" }));
}

#[test]
fn arbitrary_text_never_panics() {
    use proptest::prelude::*;
    let pieces = prop::sample::select(vec![
        "alice",
        ":",
        "$",
        "$6$",
        "$7$",
        "$argon2id$",
        "v=19",
        "m=64,t=1,p=1",
        "#",
        "\n",
        "\r",
        " ",
        "==",
        "xXs2tAVTP+W+7SYL",
        "4294967295",
        "0",
        "é",
        "\u{0}",
    ]);
    let mut runner = proptest::test_runner::TestRunner::default();
    runner
        .run(&prop::collection::vec(pieces, 0..40), |parts| {
            let text = parts.concat();
            if let Ok(file) = parse(&text) {
                let _ = file.check("alice", b"x");
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn password_file_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<PasswordFile>();
    assert_send_sync::<PasswordHash>();
}

#[test]
fn debug_output_hides_salts_and_hashes() {
    let text = format!("{:?}", hash(&ALICE_PBKDF2[6..]));
    assert!(text.contains("iterations: 101") && !text.contains("xXs2"), "{text}");
    let text = format!("{:?}", parse(ALICE_PBKDF2).unwrap());
    assert!(!text.contains("alice"), "{text}");
}
