//! A runnable example of the client library, and a quick transport comparison: signs up two
//! users on a running node, then sends N messages one at a time from one to the other over
//! WebSocket and over QUIC, waiting for each ack, and prints acked msgs/s and the ack latency.
//!
//! ```sh
//! chatnode serve --data-dir /tmp/ping-node &
//! cargo run --release -p client-proto --example ping -- http://127.0.0.1:8080 /tmp/ping-node/cluster/ca.pem 2000
//! ```

use std::time::{Duration, Instant};

use client_proto::client::{ConnectOptions, Connection, HttpClient};
use client_proto::codec::Codec;
use client_proto::Recipient;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let base = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let ca_path = args
        .next()
        .ok_or("usage: ping <http base> <ca.pem> [count]")?;
    let count: usize = args.next().map(|c| c.parse()).transpose()?.unwrap_or(1000);

    let api = HttpClient::new(base);
    let tag = std::process::id();
    let (a, b) = (format!("ping-a-{tag}"), format!("ping-b-{tag}"));
    for name in [&a, &b] {
        api.signup(name, "ping-password").await?;
    }
    let alice = api.login(&a, "ping-password", None).await?;
    let bob = api.login(&b, "ping-password", None).await?;
    let quic_url = format!("quic://{}", alice.node.quic_addr);
    let ca_pem = std::fs::read(&ca_path)?;

    for (name, url, codec) in [
        ("WebSocket (JSON)", api.ws_url(), Codec::Json),
        ("WebSocket (binary)", api.ws_url(), Codec::Binary),
        ("QUIC", quic_url, Codec::Binary),
    ] {
        let opts = ConnectOptions {
            codec,
            ca_pem: Some(ca_pem.clone()),
        };
        let mut conn = Connection::connect_with(&url, &alice.token, &opts).await?;
        let mut latencies = Vec::with_capacity(count);
        let started = Instant::now();
        for i in 0..count {
            let sent = Instant::now();
            let id = format!("{name}-{i}");
            conn.send_message(&id, Recipient::User(bob.user_id), "ping")
                .await?;
            latencies.push(sent.elapsed());
        }
        let total = started.elapsed();
        latencies.sort();
        let pct =
            |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
        println!(
            "{name:<20} {:>8.0} acked msgs/s   ack p50 {:>7.3} ms   p99 {:>7.3} ms",
            count as f64 / total.as_secs_f64(),
            ms(pct(0.50)),
            ms(pct(0.99)),
        );
        conn.close().await;
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
