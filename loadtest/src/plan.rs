//! From a command and its flags to the list of connections to open, what each does and
//! which broker endpoint (cluster node) it connects to.

use std::fmt;
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
    /// Index into [`Plan::endpoints`].
    pub node: usize,
    /// When to connect, from the start of the run.
    pub connect_at: Duration,
}

/// One entry of `--host`: a broker, or one node of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The clients of one kind, per endpoint, for the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Publishers,
    Subscribers,
    /// Idle connections (`conn`).
    Connections,
}

impl Group {
    pub const ALL: [Group; 3] = [Group::Publishers, Group::Subscribers, Group::Connections];

    pub fn name(self) -> &'static str {
        match self {
            Group::Publishers => "publishers",
            Group::Subscribers => "subscribers",
            Group::Connections => "connections",
        }
    }

    fn of(role: &Role) -> Group {
        match role {
            Role::Publisher { .. } => Group::Publishers,
            Role::Subscriber { .. } => Group::Subscribers,
            Role::Idle => Group::Connections,
        }
    }
}

#[derive(Debug)]
pub struct Plan {
    pub conns: Vec<ConnSpec>,
    /// `--host`, in its order; `ConnSpec::node` indexes it.
    pub endpoints: Vec<Endpoint>,
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

/// Parses `--host`: comma-separated `HOST`, `HOST:PORT`, `[IPV6]` or `[IPV6]:PORT`; an
/// entry without a port gets `default_port`. A bare IPv6 address (two colons or more) is a
/// host without a port.
pub fn parse_hosts(text: &str, default_port: u16) -> Result<Vec<Endpoint>, String> {
    text.split(',')
        .map(|entry| {
            let entry = entry.trim();
            let (host, port) = match entry.strip_prefix('[') {
                Some(rest) => {
                    let (addr, after) =
                        rest.split_once(']').ok_or_else(|| format!("--host {entry:?}: no closing ']'"))?;
                    match after {
                        "" => (addr, None),
                        _ => (
                            addr,
                            Some(after.strip_prefix(':').ok_or_else(|| {
                                format!("--host {entry:?}: ':PORT' or nothing must follow ']'")
                            })?),
                        ),
                    }
                }
                None => match entry.split_once(':') {
                    Some((host, port)) if !port.contains(':') => (host, Some(port)),
                    _ => (entry, None),
                },
            };
            if host.is_empty() {
                return Err(format!("--host {text:?}: an entry has no host"));
            }
            let port = match port {
                None => default_port,
                Some(p) => match p.parse::<u16>() {
                    Ok(port) if port > 0 => port,
                    _ => return Err(format!("--host {entry:?}: the port must be 1..=65535")),
                },
            };
            Ok(Endpoint { host: host.to_string(), port })
        })
        .collect()
}

/// The hosts a group of clients is spread over: `given` (indexes into the host list, as
/// `--pub-nodes`/`--sub-nodes`; an index may repeat to weigh a host), or every host when
/// nothing is given. The i-th client of the group goes to the (i mod n)-th of them.
pub fn nodes(given: &[usize], hosts: usize, flag: &str) -> Result<Vec<usize>, String> {
    if given.is_empty() {
        return Ok((0..hosts).collect());
    }
    match given.iter().find(|&&i| i >= hosts) {
        Some(i) => Err(format!("{flag} {i}: --host lists {hosts} host(s), indexes 0..={}", hosts - 1)),
        None => Ok(given.to_vec()),
    }
}

impl Plan {
    /// Per group that has clients, how many of them connect to each endpoint (in the order
    /// of `--host`; endpoints without any left out).
    pub fn placement(&self) -> Vec<(Group, Vec<(usize, u32)>)> {
        let mut out = Vec::new();
        for group in Group::ALL {
            let mut counts = vec![0u32; self.endpoints.len()];
            for c in self.conns.iter().filter(|c| Group::of(&c.role) == group) {
                counts[c.node] += 1;
            }
            let used: Vec<(usize, u32)> = counts.into_iter().enumerate().filter(|&(_, n)| n > 0).collect();
            if !used.is_empty() {
                out.push((group, used));
            }
        }
        out
    }
}

pub fn build(command: &Command) -> Result<Plan, String> {
    let o: &Opts = command.opts();
    let n = o.clients;
    let version = if o.mqtt == 5 { ProtocolVersion::V5 } else { ProtocolVersion::V311 };
    if o.mqtt == 4 {
        return Err("--mqtt takes 3 (3.1.1) or 5".into());
    }
    let endpoints = parse_hosts(&o.host, o.port)?;
    let pub_nodes = nodes(&o.pub_nodes, endpoints.len(), "--pub-nodes")?;
    let sub_nodes = nodes(&o.sub_nodes, endpoints.len(), "--sub-nodes")?;
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
            node: sub_nodes[i % sub_nodes.len()],
            connect_at: at(conns.len() as u64),
        });
    }
    for (i, topic) in pubs.into_iter().enumerate() {
        conns.push(ConnSpec {
            client_id: format!("{prefix}p{i}"),
            role: Role::Publisher { id: i as u32, topic },
            node: pub_nodes[i % pub_nodes.len()],
            connect_at: at(conns.len() as u64),
        });
    }
    for i in 0..idle {
        conns.push(ConnSpec {
            client_id: format!("{prefix}c{i}"),
            role: Role::Idle,
            node: i as usize % endpoints.len(),
            connect_at: at(conns.len() as u64),
        });
    }
    let pub_topic = if n_pubs > 0 { pattern } else { String::new() };
    Ok(Plan {
        conns,
        endpoints,
        publishers: n_pubs,
        subscribers: n_subs,
        fan,
        version,
        qos: qos_of(o.qos),
        pub_topic,
        sub_filter,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::Cli;

    fn ep(host: &str, port: u16) -> Endpoint {
        Endpoint { host: host.into(), port }
    }

    fn plan(args: &[&str]) -> Result<Plan, String> {
        let cli = Cli::try_parse_from(["ringmq-loadtest"].iter().chain(args)).map_err(|e| e.to_string())?;
        build(&cli.command)
    }

    /// (group, endpoint index, clients) of a plan, flattened.
    fn placed(p: &Plan) -> Vec<(&'static str, usize, u32)> {
        let mut out = Vec::new();
        for (group, used) in p.placement() {
            out.extend(used.into_iter().map(|(node, n)| (group.name(), node, n)));
        }
        out
    }

    #[test]
    fn one_host_takes_the_default_port() {
        assert_eq!(parse_hosts("127.0.0.1", 1883), Ok(vec![ep("127.0.0.1", 1883)]));
        assert_eq!(parse_hosts("localhost", 21883), Ok(vec![ep("localhost", 21883)]));
    }

    #[test]
    fn a_list_of_hosts_each_with_or_without_a_port() {
        assert_eq!(
            parse_hosts("10.0.0.1:21983, node-b ,10.0.0.3:21985", 1883),
            Ok(vec![ep("10.0.0.1", 21983), ep("node-b", 1883), ep("10.0.0.3", 21985)])
        );
    }

    #[test]
    fn ipv6_bare_or_in_brackets() {
        assert_eq!(parse_hosts("::1", 1883), Ok(vec![ep("::1", 1883)]));
        assert_eq!(parse_hosts("[::1]", 1883), Ok(vec![ep("::1", 1883)]));
        assert_eq!(parse_hosts("[::1]:21983,fe80::2", 1883), Ok(vec![ep("::1", 21983), ep("fe80::2", 1883)]));
        assert_eq!(ep("::1", 21983).to_string(), "[::1]:21983");
        assert_eq!(ep("127.0.0.1", 1883).to_string(), "127.0.0.1:1883");
    }

    #[test]
    fn bad_host_lists_are_refused() {
        for text in ["", "a,,b", "a,", ":1883", "a:", "a:0", "a:65536", "a:x", "[::1", "[::1]x", "[]:1883"] {
            assert!(parse_hosts(text, 1883).is_err(), "{text:?} accepted");
        }
    }

    #[test]
    fn nodes_default_to_every_host_and_are_checked() {
        assert_eq!(nodes(&[], 3, "--pub-nodes"), Ok(vec![0, 1, 2]));
        assert_eq!(nodes(&[2, 0, 2], 3, "--pub-nodes"), Ok(vec![2, 0, 2]));
        let e = nodes(&[1, 3], 3, "--sub-nodes").unwrap_err();
        assert!(e.contains("--sub-nodes 3") && e.contains("0..=2"), "{e}");
    }

    #[test]
    fn one_host_places_everything_on_it() {
        let p = plan(&["p2p", "-c", "4", "-p", "21883"]).unwrap();
        assert_eq!(p.endpoints, vec![ep("127.0.0.1", 21883)]);
        assert!(p.conns.iter().all(|c| c.node == 0));
        assert_eq!(placed(&p), vec![("publishers", 0, 4), ("subscribers", 0, 4)]);
    }

    #[test]
    fn p2p_publishers_on_a_subscribers_on_b() {
        let p =
            plan(&["p2p", "-c", "5", "-H", "h:1,h:2,h:3", "--pub-nodes", "0", "--sub-nodes", "1"]).unwrap();
        assert_eq!(placed(&p), vec![("publishers", 0, 5), ("subscribers", 1, 5)]);
    }

    #[test]
    fn fanout_subscribers_round_robin_over_the_given_nodes() {
        let p =
            plan(&["fanout", "--subscribers", "5", "-H", "a,b,c", "--pub-nodes", "0", "--sub-nodes", "1,2"])
                .unwrap();
        let subs: Vec<usize> =
            p.conns.iter().filter(|c| matches!(c.role, Role::Subscriber { .. })).map(|c| c.node).collect();
        assert_eq!(subs, vec![1, 2, 1, 2, 1]);
        assert_eq!(placed(&p), vec![("publishers", 0, 1), ("subscribers", 1, 3), ("subscribers", 2, 2)]);
    }

    #[test]
    fn by_default_each_group_goes_round_robin_over_every_host() {
        let p = plan(&["sharedsub", "-c", "4", "--subscribers", "3", "-H", "a,b,c"]).unwrap();
        assert_eq!(
            placed(&p),
            vec![
                ("publishers", 0, 2),
                ("publishers", 1, 1),
                ("publishers", 2, 1),
                ("subscribers", 0, 1),
                ("subscribers", 1, 1),
                ("subscribers", 2, 1),
            ]
        );
        let p = plan(&["conn", "-c", "7", "-H", "a,b", "--pub-nodes", "1"]).unwrap();
        assert_eq!(placed(&p), vec![("connections", 0, 4), ("connections", 1, 3)]);
    }

    #[test]
    fn an_index_past_the_host_list_is_an_error() {
        let e = plan(&["p2p", "-H", "a,b", "--sub-nodes", "2"]).unwrap_err();
        assert!(e.contains("--sub-nodes 2"), "{e}");
        assert!(plan(&["p2p", "--pub-nodes", "1"]).is_err());
    }
}
