//! From a command and its flags to the list of connections to open and what each does.

use std::time::Duration;

use ringmq::codec::{ProtocolVersion, QoS};
use ringmq::topic::{TopicFilter, TopicName};

use crate::cli::{Command, Opts};

/// How a subscriber accounts for what it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accounting {
    /// Per (publisher, subscriber) stream: every message once, in order.
    Streams,
    /// Across the shared-subscription group: every message once at some member.
    Group,
}

#[derive(Debug, Clone)]
pub enum Role {
    /// Connects and holds the connection (`conn`).
    Idle,
    Publisher {
        id: u32,
        topic: TopicName,
    },
    Subscriber {
        filter: TopicFilter,
        accounting: Accounting,
    },
}

#[derive(Debug, Clone)]
pub struct ConnSpec {
    pub client_id: String,
    pub role: Role,
    /// When to connect, from the start of the run.
    pub connect_at: Duration,
}

#[derive(Debug)]
pub struct Plan {
    pub conns: Vec<ConnSpec>,
    pub publishers: u32,
    pub subscribers: u32,
    /// Deliveries expected for each message sent (0: nothing in this process receives).
    pub fan: u64,
    pub version: ProtocolVersion,
    pub qos: QoS,
    /// Shown in the report: what the publishers publish to and the subscribers filter.
    pub pub_topic: String,
    pub sub_filter: String,
}

pub fn qos_of(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn topic_name(pattern: &str, index: u32) -> Result<TopicName, String> {
    let text = pattern.replace("%i", &index.to_string());
    TopicName::new(text.clone().into_bytes()).map_err(|e| format!("topic {text:?}: {e}"))
}

fn topic_filter(text: String) -> Result<TopicFilter, String> {
    TopicFilter::new(text.clone().into_bytes()).map_err(|e| format!("topic filter {text:?}: {e}"))
}

pub fn build(command: &Command) -> Result<Plan, String> {
    let o: &Opts = command.opts();
    let n = o.clients;
    let version = if o.mqtt == 5 { ProtocolVersion::V5 } else { ProtocolVersion::V311 };
    if o.mqtt == 4 {
        return Err("--mqtt takes 3 (3.1.1) or 5".into());
    }
    let prefix = o.client_prefix.clone().unwrap_or_else(|| format!("lt-{}-", std::process::id()));
    let default_topic = match command {
        Command::Conn(_) => "lt/conn",
        Command::Pub(_) => "lt/%i",
        Command::Sub(_) => "lt/#",
        Command::Fanin(_) => "lt/fanin/%i",
        Command::Fanout(_) => "lt/fanout",
        Command::P2p(_) => "lt/p2p/%i",
        Command::Sharedsub(_) => "lt/shared/%i",
    };
    let pattern = o.topic.clone().unwrap_or_else(|| default_topic.to_string());
    let wildcard = pattern.replace("%i", "+");

    let mut subs: Vec<(TopicFilter, Accounting)> = Vec::new();
    let mut pubs: Vec<TopicName> = Vec::new();
    let mut idle = 0;
    let (fan, sub_filter) = match command {
        Command::Conn(_) => {
            idle = n;
            (0, String::new())
        }
        Command::Pub(_) => {
            for i in 0..n {
                pubs.push(topic_name(&pattern, i)?);
            }
            (0, String::new())
        }
        Command::Sub(_) => {
            for i in 0..n {
                let text = pattern.replace("%i", &i.to_string());
                subs.push((topic_filter(text)?, Accounting::Streams));
            }
            (0, pattern.clone())
        }
        Command::Fanin(_) => {
            for i in 0..n {
                pubs.push(topic_name(&pattern, i)?);
            }
            subs.push((topic_filter(wildcard.clone())?, Accounting::Streams));
            (1, wildcard)
        }
        Command::Fanout(_) => {
            let m = o.subscribers.unwrap_or(n);
            let topic = pattern.replace("%i", "0");
            for _ in 0..o.publishers {
                pubs.push(topic_name(&topic, 0)?);
            }
            for _ in 0..m {
                subs.push((topic_filter(topic.clone())?, Accounting::Streams));
            }
            (u64::from(m), topic)
        }
        Command::P2p(_) => {
            for i in 0..n {
                pubs.push(topic_name(&pattern, i)?);
                let text = pattern.replace("%i", &i.to_string());
                subs.push((topic_filter(text)?, Accounting::Streams));
            }
            (1, pattern.clone())
        }
        Command::Sharedsub(_) => {
            let m = o.subscribers.unwrap_or(2);
            let filter = format!("$share/{}/{}", o.group, wildcard);
            for i in 0..n {
                pubs.push(topic_name(&pattern, i)?);
            }
            for _ in 0..m {
                subs.push((topic_filter(filter.clone())?, Accounting::Group));
            }
            (1, filter)
        }
    };

    // Subscribers connect first: they must hold their subscriptions before anyone
    // publishes, and the coordinator waits for every SUBACK anyway.
    let total = subs.len() as u64 + pubs.len() as u64 + u64::from(idle);
    let at = |k: u64| {
        // A rate of 0 connects everything at once.
        Duration::from_nanos(k.saturating_mul(1_000_000_000).checked_div(o.connect_rate).unwrap_or(0))
    };
    let mut conns = Vec::with_capacity(total as usize);
    let n_subs = subs.len() as u32;
    let n_pubs = pubs.len() as u32;
    for (i, (filter, accounting)) in subs.into_iter().enumerate() {
        conns.push(ConnSpec {
            client_id: format!("{prefix}s{i}"),
            role: Role::Subscriber { filter, accounting },
            connect_at: at(conns.len() as u64),
        });
    }
    for (i, topic) in pubs.into_iter().enumerate() {
        conns.push(ConnSpec {
            client_id: format!("{prefix}p{i}"),
            role: Role::Publisher { id: i as u32, topic },
            connect_at: at(conns.len() as u64),
        });
    }
    for i in 0..idle {
        conns.push(ConnSpec {
            client_id: format!("{prefix}c{i}"),
            role: Role::Idle,
            connect_at: at(conns.len() as u64),
        });
    }
    let pub_topic = if n_pubs > 0 { pattern } else { String::new() };
    Ok(Plan {
        conns,
        publishers: n_pubs,
        subscribers: n_subs,
        fan,
        version,
        qos: qos_of(o.qos),
        pub_topic,
        sub_filter,
    })
}
