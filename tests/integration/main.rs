//! Integration tests: the real broker started in-process with two shards on port 0,
//! driven with raw bytes and with a third-party client (rumqttc, MQTT 3.1.1 and 5).
//! Files are numbered by area, as mosquitto's test/broker suite is.

mod common;
mod etcd;

#[path = "18_auth.rs"]
mod auth;
#[path = "20_cluster.rs"]
mod cluster;
#[path = "22_cluster_limits.rs"]
mod cluster_limits;
#[path = "23_cluster_remainder.rs"]
mod cluster_remainder;
#[path = "21_cluster_takeover.rs"]
mod cluster_takeover;
#[path = "01_connect.rs"]
mod connect;
#[path = "10_durability.rs"]
mod durability;
#[path = "12_fuzz.rs"]
mod fuzz;
#[path = "11_hostile.rs"]
mod hostile;
#[path = "19_http.rs"]
mod http;
#[path = "19_http_metrics.rs"]
mod http_metrics;
#[path = "15_listeners.rs"]
mod listeners;
#[path = "03_malformed.rs"]
mod malformed;
#[path = "08_mqtt5.rs"]
mod mqtt5;
#[path = "14_overload.rs"]
mod overload;
#[path = "13_parking.rs"]
mod parking;
#[path = "02_pubsub.rs"]
mod pubsub;
#[path = "04_qos.rs"]
mod qos;
#[path = "06_retained.rs"]
mod retained;
#[path = "05_sessions.rs"]
mod sessions;
#[path = "09_shared.rs"]
mod shared;
#[path = "16_tls.rs"]
mod tls;
#[path = "17_websocket.rs"]
mod websocket;
#[path = "07_will.rs"]
mod will;
