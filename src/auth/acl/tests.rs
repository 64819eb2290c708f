//! Tests of ACL files: the syntax and its errors, the rules by example, and the compiled
//! matcher and the filter relations against brute force over a small alphabet.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::OnceLock;

use proptest::prelude::*;

use super::relation::{covers, overlaps};
use super::*;
use crate::topic::{TopicFilter, TopicName};

use SubscribeVerdict::{Allowed, Denied, Filtered};

fn acl(text: &str) -> Acl {
    Acl::parse(text, Path::new("test.acl")).expect("valid ACL")
}

fn error(text: &str) -> AclError {
    Acl::parse(text, Path::new("test.acl")).expect_err("invalid ACL")
}

/// The anonymous client's compiled rules for `text`.
fn anonymous(text: &str) -> ClientAcl {
    acl(text).for_client("client", None)
}

fn filter(text: &str) -> TopicFilter {
    TopicFilter::new(text.to_owned()).expect("valid filter")
}

#[test]
fn acl_is_shareable_and_client_acl_sendable() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Acl>();
    send_sync::<ClientAcl>();
}

// ---- syntax ----

#[test]
fn comments_blank_lines_and_surrounding_blanks_are_ignored() {
    let text = "# a comment\n\n   \n\t topic read a/b \t\n  # indented comment\r\ntopic write c\r\n";
    let acl = acl(text);
    assert_eq!(acl.rule_count(), 2);
    let client = acl.for_client("c", None);
    assert!(client.can_read("a/b"));
    assert!(!client.can_publish("a/b"));
    assert!(client.can_publish("c"));
}

#[test]
fn every_access_word() {
    let client = anonymous("topic read r\ntopic write w\ntopic readwrite rw\ntopic bare\ntopic deny d\n");
    let table = [
        ("r", true, false),
        ("w", false, true),
        ("rw", true, true),
        ("bare", true, true),
        ("d", false, false),
    ];
    for (topic, read, write) in table {
        assert_eq!(client.can_read(topic), read, "read {topic}");
        assert_eq!(client.can_publish(topic), write, "publish {topic}");
    }
}

#[test]
fn a_lone_word_is_the_filter_and_the_filter_is_the_rest_of_the_line() {
    // As Mosquitto: `topic read` grants readwrite on the topic `read`.
    let client = anonymous("topic read\ntopic write with  spaces/x y\n");
    assert!(client.can_read("read") && client.can_publish("read"));
    assert!(client.can_publish("with  spaces/x y"));
    assert!(!client.can_read("with  spaces/x y"));
}

#[test]
fn user_blocks_apply_to_their_user_only_and_add_up() {
    let acl = acl("topic anon/#\n\
         user alice\n\
         topic alice/#\n\
         user bob smith\n\
         topic read bob/#\n\
         user alice\n\
         topic write more/alice\n");
    assert_eq!(acl.rule_count(), 4);
    let alice = acl.for_client("c1", Some("alice"));
    assert!(alice.can_publish("alice/x"));
    assert!(alice.can_publish("more/alice"));
    assert!(!alice.can_read("bob/x"));
    assert!(!alice.can_read("anon/x"));

    let bob = acl.for_client("c2", Some("bob smith"));
    assert!(bob.can_read("bob/x"));
    assert!(!bob.can_publish("bob/x"));
    assert!(!bob.can_read("alice/x"));

    // A user without a block, and one whose name only starts like a block's.
    for name in ["carol", "bob"] {
        let other = acl.for_client("c3", Some(name));
        assert!(!other.can_read("anon/x") && !other.can_read("alice/x") && !other.can_read("bob/x"));
    }
}

#[test]
fn topics_before_the_first_user_apply_to_anonymous_clients_only() {
    let acl = acl("topic read public/#\nuser alice\ntopic read alice/#\n");
    let anonymous = acl.for_client("c", None);
    assert!(anonymous.can_read("public/news"));
    assert!(!anonymous.can_read("alice/x"));
    // An empty username is none: anonymous.
    assert!(acl.for_client("c", Some("")).can_read("public/news"));
    assert!(!acl.for_client("c", Some("alice")).can_read("public/news"));
}

#[test]
fn patterns_apply_to_every_client_wherever_they_appear() {
    let acl = acl("user alice\ntopic a\npattern read everyone/#\n");
    for username in [None, Some("alice"), Some("zed")] {
        assert!(acl.for_client("c", username).can_read("everyone/x"), "{username:?}");
    }
    assert_eq!(acl.rule_count(), 2);
}

#[test]
fn patterns_substitute_whole_levels_of_client_id_and_username() {
    let acl = acl("pattern write devices/%c/#\npattern read users/%u/inbox\npattern %u/%c\n");
    let client = acl.for_client("dev1", Some("ann"));
    assert!(client.can_publish("devices/dev1/temp"));
    assert!(!client.can_publish("devices/dev2/temp"));
    assert!(!client.can_publish("devices/%c/temp"));
    assert!(client.can_read("users/ann/inbox"));
    assert!(!client.can_read("users/bob/inbox"));
    assert!(client.can_publish("ann/dev1") && client.can_read("ann/dev1"));
    assert!(!client.can_publish("dev1/ann"));
}

#[test]
fn placeholders_inside_a_level_are_literal() {
    let client = acl("pattern a/x%c\npattern b/%c%u\npattern c/%cc\n").for_client("1", Some("u"));
    assert!(!client.can_publish("a/x1"));
    assert!(client.can_publish("a/x%c"));
    assert!(!client.can_publish("b/1u"));
    assert!(client.can_publish("b/%c%u"));
    assert!(client.can_publish("c/%cc"));
}

#[test]
fn names_with_separators_or_wildcards_skip_the_patterns_that_use_them() {
    let acl = acl("pattern devices/%c/#\npattern users/%u/#\npattern public/#\n");
    for id in ["a/b", "+", "#", "x+y", "/"] {
        let client = acl.for_client(id, Some("ann"));
        assert!(!client.can_publish(&format!("devices/{id}/t")), "{id}");
        assert!(!client.can_publish("devices/a/b/t"), "{id}");
        assert!(!client.can_publish("devices/x/t"), "{id}");
        // The rules that do not use the client id still apply.
        assert!(client.can_publish("users/ann/t"), "{id}");
        assert!(client.can_publish("public/t"), "{id}");
    }
    for name in ["a/b", "+", "#"] {
        let client = acl.for_client("c", Some(name));
        assert!(!client.can_publish("users/a/b/t") && !client.can_publish("users/x/t"), "{name}");
        assert!(client.can_publish("devices/c/t"), "{name}");
    }
}

#[test]
fn username_patterns_are_skipped_without_a_username() {
    let client = acl("pattern users/%u/#\npattern devices/%c\n").for_client("c", None);
    assert!(!client.can_publish("users//x"));
    assert!(!client.can_publish("users/x"));
    assert!(client.can_publish("devices/c"));
}

#[test]
fn an_empty_client_id_substitutes_an_empty_level() {
    let client = acl("pattern d/%c/x\npattern %c\n").for_client("", None);
    assert!(client.can_publish("d//x"));
    assert!(!client.can_publish("d/a/x"));
}

// ---- semantics ----

#[test]
fn deny_wins_wherever_it_is_written() {
    for text in ["topic #\ntopic deny secret/#\n", "topic deny secret/#\ntopic #\n"] {
        let client = anonymous(text);
        assert!(client.can_publish("open/x") && client.can_read("open/x"));
        assert!(!client.can_publish("secret/x") && !client.can_read("secret/x"));
        assert!(!client.can_read("secret"), "a/# matches a");
    }
    // A deny pattern beats the user's own grant.
    let client = acl("user ann\ntopic #\npattern deny private/%c/#\n").for_client("me", Some("ann"));
    assert!(!client.can_read("private/me/x"));
    assert!(client.can_read("private/you/x"));
}

#[test]
fn nothing_matched_is_denied() {
    let client = anonymous("topic a/b\n");
    assert!(!client.can_publish("a/c") && !client.can_read("a/b/c") && !client.can_read("a"));
    let empty = anonymous("");
    assert!(!empty.can_publish("x") && !empty.can_read("x"));
    assert_eq!(empty.subscribe("#"), Denied);
    let deny_all = ClientAcl::deny_all();
    assert!(!deny_all.can_publish("x") && !deny_all.can_read("x"));
}

#[test]
fn dollar_topics_are_matched_only_by_rules_starting_with_dollar() {
    let client = anonymous("topic #\ntopic +/status\ntopic read $SYS/broker/#\ntopic $app/+\n");
    assert!(client.can_read("any/thing"));
    assert!(!client.can_read("$SYS/load"));
    assert!(!client.can_read("$dev/status"));
    assert!(client.can_read("$SYS/broker/uptime"));
    assert!(client.can_read("$app/x") && client.can_publish("$app/x"));
    // And a wildcard deny does not reach them either.
    let client = anonymous("topic deny #\ntopic read $SYS/#\n");
    assert!(client.can_read("$SYS/x"));
    assert!(!client.can_read("x"));
}

#[test]
fn publishing_to_sys_is_refused_whatever_the_rules() {
    let client = anonymous("topic $SYS/#\ntopic $SYS\ntopic $SYSTEM/#\n");
    assert!(client.can_read("$SYS/x"));
    assert!(!client.can_publish("$SYS/x"));
    assert!(!client.can_publish("$SYS"));
    assert!(client.can_publish("$SYSTEM/x"));
    let all = ClientAcl::allow_all();
    assert!(!all.can_publish("$SYS/broker/clients"));
    assert!(all.can_publish("$SYSTEM/x") && all.can_publish("a/b"));
    assert!(all.can_read("$SYS/broker/clients"));
    assert_eq!(all.subscribe("#"), Allowed);
}

#[test]
fn empty_levels_and_multi_level_wildcards() {
    let client = anonymous("topic a//b\ntopic /#\ntopic c/+/+\ntopic read #\n");
    assert!(client.can_publish("a//b"));
    assert!(!client.can_publish("a/b"));
    assert!(client.can_publish("/") && client.can_publish("/x/y"));
    assert!(client.can_publish("c//") && client.can_publish("c/x/y"));
    assert!(!client.can_publish("c/x") && !client.can_publish("c/x/y/z"));
    assert!(client.can_read("anything/at/all"));
}

#[test]
fn many_forks_spill_the_worklist() {
    // At every level of `a/a/.../a` both an exact and a `+` child match.
    let depth = 20;
    let mut text = String::new();
    for k in 0..depth {
        let levels: Vec<&str> = (0..depth).map(|i| if i == k { "+" } else { "a" }).collect();
        writeln!(text, "topic read {}/{k}", levels.join("/")).unwrap();
    }
    let client = anonymous(&text);
    let topic = |last: usize| format!("{}/{last}", vec!["a"; depth].join("/"));
    for k in 0..depth {
        assert!(client.can_read(&topic(k)), "{k}");
    }
    assert!(!client.can_read(&topic(depth)));
}

// ---- subscribe ----

#[test]
fn subscribe_verdicts() {
    let client = anonymous(
        "topic read sensors/#\n\
         topic deny sensors/secret/#\n\
         topic write cmd/#\n\
         topic read rooms/+/temp\n\
         topic read $SYS/#\n",
    );
    let table = [
        ("sensors/room1/temp", Allowed),
        ("sensors/+/temp", Filtered),
        ("sensors/#", Filtered),
        ("sensors/secret/x", Denied),
        ("sensors/secret/#", Denied),
        ("sensors/public/#", Allowed),
        ("rooms/+/temp", Allowed),
        ("rooms/1/temp", Allowed),
        ("rooms/#", Filtered),
        ("rooms/+/+", Filtered),
        ("rooms/+/temp/x", Denied),
        ("cmd/#", Denied),
        ("#", Filtered),
        ("other/+", Denied),
        ("+/+", Filtered),
        ("$SYS/#", Allowed),
        ("+/#", Filtered),
        ("nothing", Denied),
        ("bad/#/filter", Denied),
        ("", Denied),
    ];
    for (filter, verdict) in table {
        assert_eq!(client.subscribe(filter), verdict, "{filter}");
    }
}

#[test]
fn subscribe_covered_only_by_several_rules_is_filtered() {
    let client = anonymous("topic read a/b\ntopic read a/+\n");
    assert_eq!(client.subscribe("a/+"), Allowed);
    let client = anonymous("topic read a\ntopic read a/+/#\n");
    // `a/#` is `a` plus `a/+/#`: no single rule covers it.
    assert_eq!(client.subscribe("a/#"), Filtered);
}

// ---- with_extra ----

#[test]
fn extra_grants_add_to_the_rules_and_deny_still_wins() {
    let client =
        acl("user ann\ntopic read base/#\ntopic deny base/secret\n").for_client("c", Some("ann")).with_extra(
            &["out/%c/x".to_owned(), "out/#".to_owned(), "bad/#/x".to_owned()],
            &["in/+".to_owned(), "base/secret".to_owned()],
        );
    assert!(client.can_read("base/x"));
    assert!(client.can_publish("out/a/b"));
    assert!(!client.can_read("out/a"));
    assert!(client.can_read("in/a"));
    assert!(!client.can_publish("in/a"));
    assert!(!client.can_read("base/secret"));
    assert!(!client.can_publish("bad/x/x"));
    assert_eq!(client.subscribe("in/+"), Allowed);
    assert_eq!(client.subscribe("base/#"), Filtered);

    let only_extra = ClientAcl::deny_all().with_extra(&["p".to_owned()], &[]);
    assert!(only_extra.can_publish("p") && !only_extra.can_read("p") && !only_extra.can_publish("q"));

    let all = ClientAcl::allow_all().with_extra(&["p".to_owned()], &[]);
    assert!(all.can_publish("anything") && all.can_read("anything"));
}

// ---- errors ----

#[test]
fn errors_name_the_file_and_line() {
    let table = [
        ("topic a\nfoo bar\n", 2, "unknown keyword \"foo\""),
        ("\n\ntopic reed a/b\n", 3, "unknown access \"reed\""),
        ("pattern bogus x y\n", 1, "unknown access \"bogus\""),
        ("# c\nuser\n", 2, "`user` without a name"),
        ("user   \t\n", 1, "`user` without a name"),
        ("topic\n", 1, "`topic` without a filter"),
        ("pattern   \n", 1, "`pattern` without a filter"),
        ("topic a\ntopic read a/#/b\n", 2, "invalid filter \"a/#/b\""),
        ("topic read a+\n", 1, "invalid filter \"a+\""),
        ("pattern deny %c/#x\n", 1, "invalid filter \"%c/#x\""),
        ("Topic a\n", 1, "unknown keyword \"Topic\""),
    ];
    for (text, line, reason) in table {
        let error = error(text);
        assert_eq!(error.line, line, "{text:?}");
        assert!(error.reason.starts_with(reason), "{text:?}: {}", error.reason);
        assert_eq!(error.path, Path::new("test.acl"));
    }
    let error = error("topic a\ntopic read a/#/b\n");
    assert!(error.to_string().starts_with("test.acl:2: invalid filter"), "{error}");
}

#[test]
fn load_reads_a_file_and_reports_io_and_encoding_errors() {
    let dir = std::env::temp_dir().join(format!("ringmq-acl-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let good = dir.join("good.acl");
    std::fs::write(&good, "user ann\ntopic read a/#\n").unwrap();
    let acl = Acl::load(&good).unwrap();
    assert!(acl.for_client("c", Some("ann")).can_read("a/b"));

    let bad = dir.join("bad.acl");
    std::fs::write(&bad, b"topic a\n# \xff\xfe\n").unwrap();
    let error = Acl::load(&bad).unwrap_err();
    assert_eq!((error.path.as_path(), error.line), (bad.as_path(), 2));

    let invalid = dir.join("invalid.acl");
    std::fs::write(&invalid, "topic a\ntopic a/#/b\n").unwrap();
    assert_eq!(Acl::load(&invalid).unwrap_err().line, 2);

    let missing = dir.join("missing.acl");
    let error = Acl::load(&missing).unwrap_err();
    assert_eq!((error.path.as_path(), error.line), (missing.as_path(), 0));
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- a large file ----

#[test]
fn a_thousand_rule_file_parses_and_matches() {
    const USERS: usize = 200;
    let mut text = String::from("topic read public/#\n");
    for u in 0..USERS {
        writeln!(text, "user user{u}").unwrap();
        writeln!(text, "topic readwrite users/{u}/#").unwrap();
        writeln!(text, "topic read feeds/{u}/+").unwrap();
        writeln!(text, "topic deny users/{u}/locked").unwrap();
        writeln!(text, "topic write shared/{u}").unwrap();
    }
    for k in 0..199 {
        writeln!(text, "pattern read devices/%c/{k}").unwrap();
    }
    let acl = acl(&text);
    assert_eq!(acl.rule_count(), 1 + USERS * 4 + 199);

    for u in [0, 1, 57, 199] {
        let name = format!("user{u}");
        let client = acl.for_client(&format!("dev{u}"), Some(&name));
        assert!(client.can_publish(&format!("users/{u}/x/y")));
        assert!(!client.can_publish(&format!("users/{u}/locked")));
        assert!(!client.can_publish(&format!("users/{}/x", (u + 1) % USERS)));
        assert!(client.can_read(&format!("feeds/{u}/a")) && !client.can_read(&format!("feeds/{u}/a/b")));
        assert!(client.can_publish(&format!("shared/{u}")) && !client.can_read(&format!("shared/{u}")));
        assert!(client.can_read(&format!("devices/dev{u}/198")));
        assert!(!client.can_read(&format!("devices/dev{u}/199")));
        assert!(!client.can_read("devices/other/0"));
        assert!(!client.can_read("public/x"));
        assert_eq!(client.subscribe(&format!("users/{u}/#")), Filtered);
        assert_eq!(client.subscribe(&format!("users/{u}/open/#")), Allowed);
        assert_eq!(client.subscribe(&format!("devices/dev{u}/+")), Filtered);
    }
    assert!(acl.for_client("x", None).can_read("public/x"));
}

// ---- brute force over a small alphabet ----

/// Levels filters are made of: a plain one, a `$` one (the `$` rule bites when it comes
/// first), an empty one and `+`; a `#` may end any filter.
const FILTER_LEVELS: [&str; 4] = ["a", "$s", "", "+"];
/// Topic levels: those of the filters and one no filter names, for `+` to stand for.
const TOPIC_LEVELS: [&str; 4] = ["a", "$s", "", "z"];

/// Every topic of 1 to 4 levels: one more than the longest filter, enough for a witness of
/// an overlap or against a cover to exist among them.
fn universe() -> &'static [TopicName] {
    static TOPICS: OnceLock<Vec<TopicName>> = OnceLock::new();
    TOPICS.get_or_init(|| {
        let mut topics = Vec::new();
        let mut current: Vec<Vec<&str>> = vec![vec![]];
        for _ in 0..4 {
            current = current
                .iter()
                .flat_map(|prefix| {
                    TOPIC_LEVELS.iter().map(move |level| {
                        let mut next = prefix.clone();
                        next.push(level);
                        next
                    })
                })
                .collect();
            topics.extend(current.iter().filter_map(|levels| TopicName::new(levels.join("/")).ok()));
        }
        topics
    })
}

fn any_filter() -> impl Strategy<Value = String> {
    (prop::collection::vec(prop::sample::select(&FILTER_LEVELS[..]), 0..=3), any::<bool>())
        .prop_map(|(levels, hash)| {
            let mut levels = levels;
            if hash || levels.is_empty() {
                levels.push("#");
            }
            levels.join("/")
        })
        .prop_filter("valid filter", |text| TopicFilter::new(text.clone()).is_ok())
}

fn any_access() -> impl Strategy<Value = &'static str> {
    prop::sample::select(&["read", "write", "readwrite", "deny"][..])
}

fn brute_covers(rule: &str, filter_text: &str) -> bool {
    let (rule, filter_) = (filter(rule), filter(filter_text));
    universe().iter().all(|topic| !filter_.matches(topic) || rule.matches(topic))
}

fn brute_overlaps(a: &str, b: &str) -> bool {
    let (a, b) = (filter(a), filter(b));
    universe().iter().any(|topic| a.matches(topic) && b.matches(topic))
}

/// The rules' verdict on a topic, read straight from the semantics.
fn naive_allows(rules: &[(&str, String)], topic: &TopicName, need: &str) -> bool {
    let matching = || rules.iter().filter(|(_, f)| filter(f).matches(topic));
    !matching().any(|(access, _)| *access == "deny")
        && matching().any(|(access, _)| *access == "readwrite" || *access == need)
}

proptest! {
    #[test]
    fn covers_agrees_with_brute_force(rule in any_filter(), filter in any_filter()) {
        prop_assert_eq!(covers(&rule, &filter), brute_covers(&rule, &filter));
    }

    #[test]
    fn overlaps_agrees_with_brute_force(a in any_filter(), b in any_filter()) {
        prop_assert_eq!(overlaps(&a, &b), brute_overlaps(&a, &b));
        prop_assert_eq!(overlaps(&a, &b), overlaps(&b, &a));
    }

    #[test]
    fn compiled_rules_agree_with_the_semantics(
        rules in prop::collection::vec((any_access(), any_filter()), 0..10),
        subscription in any_filter(),
    ) {
        let text: String = rules.iter().map(|(access, f)| format!("topic {access} {f}\n")).collect();
        let client = anonymous(&text);
        for topic in universe() {
            let name = topic.as_str();
            prop_assert_eq!(client.can_read(name), naive_allows(&rules, topic, "read"), "read {}", name);
            prop_assert_eq!(client.can_publish(name), naive_allows(&rules, topic, "write"), "write {}", name);
        }

        // The verdict, from its definition with brute-force relations...
        let of = |deny: bool| {
            rules
                .iter()
                .filter(move |(a, _)| if deny { *a == "deny" } else { *a == "read" || *a == "readwrite" })
                .map(|(_, f)| f.as_str())
        };
        let expected = if of(true).any(|d| brute_covers(d, &subscription))
            || !of(false).any(|r| brute_overlaps(r, &subscription))
        {
            Denied
        } else if of(false).any(|r| brute_covers(r, &subscription))
            && !of(true).any(|d| brute_overlaps(d, &subscription))
        {
            Allowed
        } else {
            Filtered
        };
        let verdict = client.subscribe(&subscription);
        prop_assert_eq!(verdict, expected);

        // ...and sound: Allowed delivers only readable topics, Denied withholds none.
        let subscription = filter(&subscription);
        for topic in universe().iter().filter(|t| subscription.matches(t)) {
            match verdict {
                Allowed => prop_assert!(client.can_read(topic.as_str()), "{}", topic),
                Denied => prop_assert!(!client.can_read(topic.as_str()), "{}", topic),
                Filtered => {}
            }
        }
    }
}

#[test]
fn grants_on_top_of_nothing_allow_only_what_they_name() {
    let client = ClientAcl::deny_all().with_extra(&["dev/1/#".to_string()], &["cmd/1".to_string()]);
    assert!(client.can_publish("dev/1/temp"));
    assert!(!client.can_publish("dev/2/temp"));
    assert!(client.can_read("cmd/1"));
    assert!(!client.can_read("cmd/2"));
    assert_eq!(client.subscribe("cmd/1"), Allowed);
    assert_eq!(client.subscribe("cmd/2"), Denied);
    assert_eq!(client.subscribe("cmd/+"), Filtered);
}

#[test]
fn names_starting_with_a_dollar_or_empty_are_not_substituted() {
    let acl = acl("pattern read %c/#\npattern read users/%u/inbox\ntopic read public/#\n");
    let dollar = acl.for_client("$SYS", None);
    assert!(!dollar.can_read("$SYS/broker/uptime"));
    let empty = acl.for_client("c", Some(""));
    assert!(empty.can_read("public/x"), "an empty username is anonymous");
    assert!(!empty.can_read("users//inbox"));
}
