use std::io::Cursor;
use std::os::unix::fs::PermissionsExt;

use super::*;

// Written by Mosquitto 2.0.11's mosquitto_passwd; both passwords are `secret`.
const ALICE_PBKDF2: &str = "alice:$7$101$xXs2tAVTP+W+7SYL$VIg232tirEoRNNqvDwObl+eBV0ZQMkTqWtWr5DeY8c04qw/8FKUMbUApb/O1SUJXCiL/lIlI1fs9GKuQkCVS4w==";
const BOB_SHA512: &str = "bob:$6$K1ZS9BgpRhN13Qq7$jryIplq1LCSWo8v5qBebVC5Rd0/7MHZ4VcyP4aUWPD0cTAi03HSM9I/yThvEiFtU2VFNXvknjPz6XOa/6Q0+Sg==";

/// A fresh directory of its own for one test, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("ringmq-passwd-cli-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The names in the directory, sorted: temporary files must not linger.
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn args(words: &[&str]) -> Vec<OsString> {
    words.iter().map(OsString::from).collect()
}

fn run_words(words: &[&str]) -> i32 {
    run(&args(words))
}

/// Parses and executes; a prompt is an error (tests never read the terminal).
fn outcome(words: &[&str]) -> Result<(), CliError> {
    match parse_args(&args(words))? {
        Parsed::Help => Ok(()),
        Parsed::Run(invocation) => execute(&invocation, &mut || panic!("prompted")),
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn load(path: &Path) -> PasswordFile {
    PasswordFile::load(path).unwrap()
}

#[test]
fn create_writes_one_argon2id_user_with_mode_0600() {
    let dir = TempDir::new("create");
    let file = dir.file("passwd");
    assert_eq!(run_words(&["-c", "-b", file.to_str().unwrap(), "alice", "s3cret"]), 0);
    let text = read(&file);
    assert!(text.starts_with("alice:$argon2id$v=19$") && text.ends_with('\n'), "{text}");
    assert_eq!(text.lines().count(), 1);
    assert_eq!(mode(&file), 0o600);
    let users = load(&file);
    assert_eq!(users.len(), 1);
    assert!(users.check("alice", b"s3cret"));
    assert!(!users.check("alice", b"secret"));
    assert!(!users.check("bob", b"s3cret"));
    assert_eq!(dir.names(), ["passwd"]);
}

#[test]
fn create_overwrites_an_existing_file() {
    let dir = TempDir::new("overwrite");
    let file = dir.file("passwd");
    std::fs::write(&file, format!("{ALICE_PBKDF2}\n{BOB_SHA512}\n")).unwrap();
    // Options may be combined.
    assert_eq!(run_words(&["-cb", file.to_str().unwrap(), "carol", "pw"]), 0);
    let users = load(&file);
    assert_eq!(users.len(), 1);
    assert!(users.check("carol", b"pw"));
    assert!(users.get("alice").is_none());
}

#[test]
fn add_keeps_other_lines_and_comments_as_they_were() {
    let dir = TempDir::new("add");
    let file = dir.file("passwd");
    let original = format!("# site users\n\n{ALICE_PBKDF2}\r\n  {BOB_SHA512}\n");
    std::fs::write(&file, &original).unwrap();
    assert_eq!(run_words(&["-b", file.to_str().unwrap(), "carol", "pa:ss wörd"]), 0);
    let text = read(&file);
    let added = text.strip_prefix(&original).expect("the old text comes first, unchanged");
    assert!(added.starts_with("carol:$argon2id$") && added.ends_with('\n') && added.lines().count() == 1);
    let users = load(&file);
    assert_eq!(users.len(), 3);
    assert!(users.check("alice", b"secret"));
    assert!(users.check("bob", b"secret"));
    assert!(users.check("carol", "pa:ss wörd".as_bytes()));
    assert!(!users.check("carol", b"pa"));
    assert_eq!(dir.names(), ["passwd"]);
}

#[test]
fn add_to_a_file_without_a_final_newline_starts_a_new_line() {
    let dir = TempDir::new("no-newline");
    let file = dir.file("passwd");
    std::fs::write(&file, ALICE_PBKDF2).unwrap();
    assert_eq!(run_words(&["-b", file.to_str().unwrap(), "bob", "pw"]), 0);
    let text = read(&file);
    assert!(text.starts_with(&format!("{ALICE_PBKDF2}\nbob:$argon2id$")), "{text}");
    let users = load(&file);
    assert!(users.check("alice", b"secret") && users.check("bob", b"pw"));
}

#[test]
fn update_replaces_only_that_users_line_in_place() {
    let dir = TempDir::new("update");
    let file = dir.file("passwd");
    std::fs::write(&file, format!("{ALICE_PBKDF2}\n# bob below\n{BOB_SHA512}\r\n# end\n")).unwrap();
    assert_eq!(run_words(&["-b", file.to_str().unwrap(), "alice", "new one"]), 0);
    let text = read(&file);
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines[0].starts_with("alice:$argon2id$") && lines[0].ends_with("\n"));
    assert_eq!(lines[1..], ["# bob below\n", &format!("{BOB_SHA512}\r\n"), "# end\n"]);
    let users = load(&file);
    assert!(users.check("alice", b"new one"));
    assert!(!users.check("alice", b"secret"));
    assert!(users.check("bob", b"secret"));
    // Updating again replaces the argon2id line; the CRLF of bob's line survives an update of bob.
    assert_eq!(run_words(&["-b", file.to_str().unwrap(), "bob", "other"]), 0);
    let text = read(&file);
    let bob_line = text.split('\n').find(|l| l.starts_with("bob:")).unwrap();
    assert!(bob_line.starts_with("bob:$argon2id$") && bob_line.ends_with('\r'), "{bob_line:?}");
    let users = load(&file);
    assert_eq!(users.len(), 2);
    assert!(users.check("bob", b"other") && users.check("alice", b"new one"));
}

#[test]
fn update_keeps_the_mode_of_an_existing_file() {
    let dir = TempDir::new("mode");
    let file = dir.file("passwd");
    std::fs::write(&file, format!("{ALICE_PBKDF2}\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(run_words(&["-b", file.to_str().unwrap(), "bob", "pw"]), 0);
    assert_eq!(mode(&file), 0o640);
}

#[test]
fn delete_removes_the_user_and_keeps_the_rest() {
    let dir = TempDir::new("delete");
    let file = dir.file("passwd");
    std::fs::write(&file, format!("# users\n{ALICE_PBKDF2}\n{BOB_SHA512}\n")).unwrap();
    assert_eq!(run_words(&["-D", file.to_str().unwrap(), "alice"]), 0);
    assert_eq!(read(&file), format!("# users\n{BOB_SHA512}\n"));
    let users = load(&file);
    assert!(!users.check("alice", b"secret"));
    assert!(users.check("bob", b"secret"));
    // Deleting a user who is not there fails and leaves the file alone.
    let before = read(&file);
    assert_eq!(run_words(&["-D", file.to_str().unwrap(), "alice"]), 1);
    assert!(
        matches!(outcome(&["-D", file.to_str().unwrap(), "alice"]), Err(CliError::UserNotFound(u)) if u == "alice")
    );
    assert_eq!(read(&file), before);
}

#[test]
fn missing_file_without_c_is_an_error_and_creates_nothing() {
    let dir = TempDir::new("missing");
    let file = dir.file("passwd");
    let path = file.to_str().unwrap();
    assert_eq!(run_words(&["-b", path, "alice", "pw"]), 1);
    assert_eq!(run_words(&["-D", path, "alice"]), 1);
    match outcome(&["-b", path, "alice", "pw"]) {
        Err(CliError::Open { path: p, source }) => {
            assert_eq!(p, file);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }
    assert!(dir.names().is_empty());
}

#[test]
fn a_file_ringmq_would_refuse_is_not_edited() {
    let dir = TempDir::new("malformed");
    let file = dir.file("passwd");
    let original = format!("{ALICE_PBKDF2}\nbob:plaintext\n");
    std::fs::write(&file, &original).unwrap();
    assert_eq!(run_words(&["-b", file.to_str().unwrap(), "carol", "pw"]), 1);
    match outcome(&["-D", file.to_str().unwrap(), "alice"]) {
        Err(CliError::File(PasswordFileError::Malformed { line: 2, .. })) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(read(&file), original);
    // -c replaces it whatever it held.
    assert_eq!(run_words(&["-c", "-b", file.to_str().unwrap(), "carol", "pw"]), 0);
    assert!(load(&file).check("carol", b"pw"));
}

#[test]
fn a_symbolic_link_is_followed_and_kept() {
    let dir = TempDir::new("symlink");
    let real = dir.file("real");
    let link = dir.file("link");
    std::fs::write(&real, format!("{ALICE_PBKDF2}\n")).unwrap();
    std::os::unix::fs::symlink(&real, &link).unwrap();
    assert_eq!(run_words(&["-b", link.to_str().unwrap(), "bob", "pw"]), 0);
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert!(load(&real).check("bob", b"pw"));
    assert_eq!(dir.names(), ["link", "real"]);
}

#[test]
fn wrong_arguments_are_refused_before_touching_the_file() {
    let dir = TempDir::new("arguments");
    let file = dir.file("passwd");
    std::fs::write(&file, format!("{ALICE_PBKDF2}\n")).unwrap();
    let path = file.to_str().unwrap();
    let usage: &[&[&str]] =
        &[&[], &[path], &["-b", path, "bob"], &[path, "bob", "pw"], &["-b", path, "u", "p", "x"]];
    for words in usage {
        assert!(matches!(outcome(words), Err(CliError::Usage)), "{words:?}");
        assert_eq!(run_words(words), 1);
    }
    assert!(matches!(outcome(&["-c", "-D", path, "bob"]), Err(CliError::CreateAndDelete)));
    assert!(matches!(outcome(&["-b", "-D", path, "bob", "pw"]), Err(CliError::BatchAndDelete)));
    assert!(matches!(outcome(&["-H", "sha512", path, "bob"]), Err(CliError::UnknownOption(o)) if o == "-H"));
    let bad_users = [
        ("a:b", "must not contain the ':' character"),
        ("", "must not be empty"),
        ("tab\there", "must not contain control characters"),
        ("#bob", "must not start with '#'"),
        (" bob", "must not start or end with blanks"),
    ];
    for (user, problem) in bad_users {
        match outcome(&["-b", path, user, "pw"]) {
            Err(e @ CliError::BadUser(p)) => {
                assert_eq!(p, problem);
                assert_eq!(e.to_string(), format!("Error: Username {problem}."));
            }
            other => panic!("{user:?}: {other:?}"),
        }
        assert_eq!(run_words(&["-b", path, user, "pw"]), 1);
    }
    let long = "p".repeat(MAX_FIELD_LEN + 1);
    assert!(matches!(outcome(&["-b", path, "bob", &long]), Err(CliError::PasswordTooLong)));
    assert_eq!(read(&file), format!("{ALICE_PBKDF2}\n"));
    assert_eq!(run_words(&["--help"]), 0);
    // After `--`, a word starting with '-' is the file.
    assert_eq!(
        parse_args(&args(&["-b", "--", "-f", "bob", "pw"])).unwrap(),
        Parsed::Run(Invocation {
            create: false,
            file: PathBuf::from("-f"),
            user: "bob".into(),
            change: Change::Set(Some(b"pw".to_vec())),
        })
    );
}

#[test]
fn without_b_the_password_is_asked_for_and_with_d_it_is_not() {
    let dir = TempDir::new("prompt");
    let file = dir.file("passwd");
    let path = file.to_str().unwrap();
    let Parsed::Run(create) = parse_args(&args(&["-c", path, "alice"])).unwrap() else { panic!() };
    assert_eq!(create.change, Change::Set(None));
    let mut asked = 0;
    execute(&create, &mut || {
        asked += 1;
        Ok(b"typed".to_vec())
    })
    .unwrap();
    assert_eq!(asked, 1);
    assert!(load(&file).check("alice", b"typed"));
    // A refused prompt leaves the file as it was.
    let Parsed::Run(update) = parse_args(&args(&[path, "alice"])).unwrap() else { panic!() };
    let before = read(&file);
    assert!(matches!(
        execute(&update, &mut || Err(CliError::PasswordsDiffer)),
        Err(CliError::PasswordsDiffer)
    ));
    assert_eq!(read(&file), before);
    assert_eq!(outcome(&["-D", path, "alice"]).ok(), Some(()));
    assert!(load(&file).is_empty());
}

#[test]
fn prompt_reads_the_password_twice() {
    let ask = |input: &str| {
        let mut out = Vec::new();
        let result = read_new_password(&mut Cursor::new(input.as_bytes().to_vec()), &mut out);
        (result, String::from_utf8(out).unwrap())
    };
    let (result, shown) = ask("hunter2\nhunter2\n");
    assert_eq!(result.unwrap(), b"hunter2");
    assert_eq!(shown, "Password: \nReenter password: \n");
    assert_eq!(ask("a b:c\r\na b:c").0.unwrap(), b"a b:c");
    assert!(matches!(ask("one\ntwo\n").0, Err(CliError::PasswordsDiffer)));
    assert!(matches!(ask("\n\n").0, Err(CliError::EmptyPassword)));
    assert!(matches!(ask("one\n").0, Err(CliError::NoPassword)));
    assert!(matches!(ask("").0, Err(CliError::NoPassword)));
    let long = "p".repeat(MAX_FIELD_LEN + 1);
    assert!(matches!(ask(&format!("{long}\n{long}\n")).0, Err(CliError::PasswordTooLong)));
    let longest = "p".repeat(MAX_FIELD_LEN);
    assert_eq!(ask(&format!("{longest}\r\n{longest}\n")).0.unwrap().len(), MAX_FIELD_LEN);
}

#[test]
fn mosquitto_fixtures_verify_through_the_file_the_command_edits() {
    let dir = TempDir::new("fixtures");
    let file = dir.file("passwd");
    std::fs::write(&file, format!("{ALICE_PBKDF2}\n{BOB_SHA512}\n")).unwrap();
    let users = load(&file);
    assert!(users.check("alice", b"secret") && users.check("bob", b"secret"));
    assert!(!users.check("alice", b"wrong") && !users.check("bob", b"wrong"));
}

#[test]
fn set_and_remove_user_edit_text_exactly() {
    assert_eq!(set_user("", "u", "H"), "u:H\n");
    assert_eq!(set_user("# c", "u", "H"), "# c\nu:H\n");
    assert_eq!(set_user("a:X\n u :Y\r\nb:Z", "u", "H"), "a:X\nu:H\r\nb:Z");
    assert_eq!(set_user("a:X\nb:Z", "b", "H"), "a:X\nb:H");
    assert_eq!(remove_user("a:X\n u :Y\r\nb:Z", "u").as_deref(), Some("a:X\nb:Z"));
    assert_eq!(remove_user("a:X\n#u:Y\n", "u"), None);
}
