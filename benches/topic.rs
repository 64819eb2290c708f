//! Publish-path matching in the subscription tree: 100k exact filters, and 100k filters
//! with a mix of wildcards, each against topics that hit and topics that miss.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use ringmq::topic::{SubscriptionTree, TopicFilter, TopicName};

const FILTERS: u64 = 100_000;
/// `site/{0..SITES}/device/{0..FILTERS/SITES}/...`: 100 sites of 1000 devices.
const SITES: u64 = 100;

fn filter(text: String) -> TopicFilter {
    TopicFilter::new(text).expect("valid filter")
}

fn exact_tree() -> SubscriptionTree<u64, u8> {
    let mut tree = SubscriptionTree::new();
    for i in 0..FILTERS {
        let (site, device) = (i % SITES, i / SITES);
        tree.insert(&filter(format!("site/{site}/device/{device}/temp")), i, 1);
    }
    tree
}

fn mixed_tree() -> SubscriptionTree<u64, u8> {
    let mut tree = SubscriptionTree::new();
    for i in 0..FILTERS {
        let (site, device) = (i % SITES, i / SITES);
        let text = match i % 4 {
            0 => format!("site/{site}/device/{device}/temp"),
            1 => format!("site/{site}/+/{device}/temp"),
            2 => format!("site/{site}/device/{device}/#"),
            _ => format!("+/{site}/device/{device}/+"),
        };
        tree.insert(&filter(text), i, 1);
    }
    // A few broad subscriptions, as dashboards and bridges make.
    for (key, text) in ["site/+/device/#", "site/42/#", "+/+/+/+/temp"].iter().enumerate() {
        tree.insert(&filter(text.to_string()), FILTERS + key as u64, 0);
    }
    tree
}

fn count_matches(tree: &SubscriptionTree<u64, u8>, topic: &TopicName) -> usize {
    let mut n = 0;
    tree.for_each_match(topic, |f, k, v| {
        black_box((f, k, v));
        n += 1;
    });
    n
}

/// `miss` is a topic no filter of `tree` matches, for `has_match`.
fn bench_tree(
    c: &mut Criterion,
    name: &str,
    tree: &SubscriptionTree<u64, u8>,
    topics: &[&str],
    miss: &'static str,
) {
    let mut group = c.benchmark_group(name);
    for text in topics {
        let topic = TopicName::new(text.to_string()).expect("valid topic");
        let hits = count_matches(tree, &topic);
        group.bench_function(format!("for_each_match {text} ({hits} hits)"), |b| {
            b.iter(|| count_matches(tree, black_box(&topic)))
        });
    }
    let miss = TopicName::from_static(miss);
    assert!(!tree.has_match(&miss), "{miss} matches");
    group.bench_function(format!("has_match {miss} (miss)"), |b| b.iter(|| tree.has_match(black_box(&miss))));
    group.finish();
}

fn matching(c: &mut Criterion) {
    let exact = exact_tree();
    bench_tree(
        c,
        "exact_100k",
        &exact,
        &["site/42/device/512/temp", "site/42/device/512/humidity", "other/42/device/512/temp"],
        "site/42/device/999999/temp",
    );
    drop(exact);

    let mixed = mixed_tree();
    bench_tree(
        c,
        "mixed_100k",
        &mixed,
        &[
            "site/42/device/512/temp",
            "site/7/device/3/temp",
            "site/7/gateway/3/temp",
            "site/7/device/999999/humidity",
            "$SYS/7/device/3/temp",
        ],
        "other/7/gadget/3/humidity",
    );
}

fn churn(c: &mut Criterion) {
    let mut tree = mixed_tree();
    let f = filter("site/7/device/123456/#".to_string());
    c.bench_function("mixed_100k/insert+remove", |b| {
        b.iter(|| {
            tree.insert(black_box(&f), 1 << 40, 1);
            tree.remove(black_box(&f), &(1 << 40))
        })
    });
}

criterion_group! {
    name = benches;
    // Short runs: the build machine has two cores shared with other work.
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = matching, churn
}
criterion_main!(benches);
