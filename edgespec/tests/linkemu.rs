//! The link emulator against real loopback servers: integrity, delay, bandwidth, cut/restore,
//! live profile changes and shutdown. Timing assertions are lower bounds (a correctness
//! property of the emulator); upper bounds are deliberately generous because CI machines are
//! loaded.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use edgespec::linkemu::{CutMode, LinkConfig, LinkControl, LinkEmulator, LinkProfile};
use rand::{rngs::StdRng, RngCore, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

const MS: Duration = Duration::from_millis(1);
/// Bound on anything that should happen "soon"; only reached when a test is failing.
const DEADLINE: Duration = Duration::from_secs(10);

/// Echoes every connection back, passing half-close through.
async fn echo_server() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    Ok(addr)
}

/// Per connection: sends `payload` while reading everything the client sends, half-closes after
/// sending, and reports what it received.
async fn swap_server(payload: Vec<u8>) -> Result<(SocketAddr, mpsc::Receiver<Vec<u8>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (payload, tx) = (payload.clone(), tx.clone());
            tokio::spawn(async move {
                if let Ok(got) = swap(stream, &payload).await {
                    let _ = tx.send(got).await;
                }
            });
        }
    });
    Ok((addr, rx))
}

/// Writes `payload` then half-closes, concurrently reading until the peer half-closes.
async fn swap(mut stream: TcpStream, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let (mut r, mut w) = stream.split();
    let send = async {
        w.write_all(payload).await?;
        w.shutdown().await
    };
    let recv = async {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await?;
        Ok(got)
    };
    let ((), got) = tokio::try_join!(send, recv)?;
    Ok(got)
}

struct Emu {
    addr: SocketAddr,
    control: LinkControl,
    task: JoinHandle<()>,
    stop: Option<oneshot::Sender<()>>,
}

async fn emulator(upstream: SocketAddr, config: impl Into<LinkConfig>) -> Result<Emu> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let (stop, stopped) = oneshot::channel::<()>();
    let (task, control) = LinkEmulator::spawn(listener, upstream, config, async {
        let _ = stopped.await;
    })?;
    Ok(Emu {
        addr: control.local_addr(),
        control,
        task,
        stop: Some(stop),
    })
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// One small ping-pong over `stream`; returns the round-trip time.
async fn ping(stream: &mut TcpStream) -> Result<Duration> {
    let start = Instant::now();
    stream.write_all(b"ping").await?;
    let mut buf = [0u8; 4];
    timeout(DEADLINE, stream.read_exact(&mut buf))
        .await
        .context("ping timed out")??;
    ensure!(&buf == b"ping", "echo corrupted: {buf:?}");
    Ok(start.elapsed())
}

/// True once the peer has closed or reset `stream` (as opposed to it staying silent).
async fn is_broken(stream: &mut TcpStream) -> Result<bool> {
    let mut buf = [0u8; 16];
    let r = timeout(DEADLINE, stream.read(&mut buf))
        .await
        .context("connection neither closed nor reset")?;
    Ok(matches!(r, Ok(0) | Err(_)))
}

/// True if a connection to `addr` is reset or closed before it answers a ping. The emulator
/// accepts and then resets, so the reset may already show in `connect`.
async fn turned_away(addr: SocketAddr) -> Result<bool> {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return Ok(true);
    };
    let _ = stream.write_all(b"ping").await;
    is_broken(&mut stream).await
}

/// True if `stream` stays silent for `window` after a ping (a blackhole).
async fn stays_silent(stream: &mut TcpStream, window: Duration) -> Result<bool> {
    stream.write_all(b"ping").await?;
    let mut buf = [0u8; 16];
    Ok(timeout(window, stream.read(&mut buf)).await.is_err())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payloads_pass_unchanged_in_order_both_ways_with_jitter() -> Result<()> {
    let to_client = random_bytes(3 << 20, 1);
    let to_server = random_bytes((2 << 20) + 12_345, 2);
    let (upstream, mut received) = swap_server(to_client.clone()).await?;
    // Jitter far larger than the delay: any reordering would corrupt the payload.
    let profile = LinkProfile::delay(MS).with_jitter(5 * MS);
    let emu = emulator(upstream, profile).await?;

    let stream = TcpStream::connect(emu.addr).await?;
    let got = timeout(DEADLINE * 3, swap(stream, &to_server)).await??;
    assert!(got == to_client, "download corrupted ({} bytes)", got.len());
    let at_server = timeout(DEADLINE, received.recv())
        .await?
        .context("server hung up")?;
    assert!(
        at_server == to_server,
        "upload corrupted ({} bytes)",
        at_server.len()
    );

    let stats = emu.control.stats();
    assert_eq!(stats.bytes_up, to_server.len() as u64);
    assert_eq!(stats.bytes_down, to_client.len() as u64);
    assert_eq!(stats.connections_accepted, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_paced_transfer_is_intact() -> Result<()> {
    let to_client = random_bytes(300_000, 3);
    let to_server = random_bytes(200_000, 4);
    let (upstream, mut received) = swap_server(to_client.clone()).await?;
    let emu = emulator(upstream, LinkProfile::wan(4 * MS, 100).with_jitter(2 * MS)).await?;
    let got = timeout(
        DEADLINE,
        swap(TcpStream::connect(emu.addr).await?, &to_server),
    )
    .await??;
    assert!(got == to_client, "download corrupted");
    let at_server = timeout(DEADLINE, received.recv())
        .await?
        .context("server hung up")?;
    assert!(at_server == to_server, "upload corrupted");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_message_rtt_is_twice_the_one_way_delay() -> Result<()> {
    let one_way = 25 * MS;
    let emu = emulator(echo_server().await?, LinkProfile::delay(one_way)).await?;
    let mut stream = TcpStream::connect(emu.addr).await?;
    for _ in 0..5 {
        let rtt = ping(&mut stream).await?;
        assert!(rtt >= 2 * one_way, "rtt {rtt:?} undercuts 2 x {one_way:?}");
        assert!(rtt < 2 * one_way + Duration::from_secs(2), "rtt {rtt:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asymmetric_delays_add_up() -> Result<()> {
    let config = LinkConfig::asymmetric(LinkProfile::delay(10 * MS), LinkProfile::delay(40 * MS));
    let emu = emulator(echo_server().await?, config).await?;
    let mut stream = TcpStream::connect(emu.addr).await?;
    let rtt = ping(&mut stream).await?;
    assert!(rtt >= 50 * MS, "rtt {rtt:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_limits_both_directions() -> Result<()> {
    const N: usize = 100_000;
    const BPS: u64 = 4_000_000;
    let floor = Duration::from_secs_f64(N as f64 * 8.0 / BPS as f64); // 200 ms
    let profile = LinkProfile::ideal().with_bandwidth(Some(BPS));

    // Up: from the first byte written to the server seeing EOF.
    let (upstream, mut received) = swap_server(Vec::new()).await?;
    let emu = emulator(upstream, profile).await?;
    let stream = TcpStream::connect(emu.addr).await?;
    let start = Instant::now();
    swap(stream, &random_bytes(N, 5)).await?;
    let at_server = timeout(DEADLINE, received.recv())
        .await?
        .context("server hung up")?;
    let took = start.elapsed();
    assert_eq!(at_server.len(), N);
    assert!(took >= floor, "{N} bytes up took {took:?} < {floor:?}");

    // Down: from connecting to reading the server's EOF.
    let (upstream, _received) = swap_server(random_bytes(N, 6)).await?;
    let emu = emulator(upstream, profile).await?;
    let start = Instant::now();
    let got = swap(TcpStream::connect(emu.addr).await?, b"").await?;
    let took = start.elapsed();
    assert_eq!(got.len(), N);
    assert!(took >= floor, "{N} bytes down took {took:?} < {floor:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_keeps_the_other_direction_open() -> Result<()> {
    let emu = emulator(echo_server().await?, LinkProfile::delay(5 * MS)).await?;
    let mut stream = TcpStream::connect(emu.addr).await?;
    stream.write_all(b"last words").await?;
    stream.shutdown().await?; // FIN upstream; the echo still answers, then closes
    let mut got = Vec::new();
    timeout(DEADLINE, stream.read_to_end(&mut got)).await??;
    assert_eq!(got, b"last words");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_resets_connections_until_restore() -> Result<()> {
    let emu = emulator(echo_server().await?, LinkProfile::delay(MS)).await?;
    let mut active = TcpStream::connect(emu.addr).await?;
    ping(&mut active).await?;
    assert_eq!(emu.control.stats().connections_active, 1);

    emu.control.cut_with(CutMode::Reset);
    assert!(emu.control.is_cut());
    assert!(
        is_broken(&mut active).await?,
        "active connection survived the cut"
    );

    assert!(
        turned_away(emu.addr).await?,
        "new connection got through a cut link"
    );

    emu.control.restore();
    let mut fresh = TcpStream::connect(emu.addr).await?;
    ping(&mut fresh).await?;
    let stats = emu.control.stats();
    assert!(stats.connections_refused >= 1, "{stats:?}");
    assert_eq!(stats.connections_active, 1, "{stats:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_silences_connections_and_restore_resets_them() -> Result<()> {
    let mut config = LinkConfig::symmetric(LinkProfile::delay(MS));
    config.cut_mode = CutMode::Blackhole;
    let emu = emulator(echo_server().await?, config).await?;
    let mut active = TcpStream::connect(emu.addr).await?;
    ping(&mut active).await?;

    emu.control.cut();
    // Silence is checked over a window; the emulator forwards a ping in ~2 ms when healthy.
    assert!(
        stays_silent(&mut active, 300 * MS).await?,
        "blackholed connection answered"
    );
    let mut during = TcpStream::connect(emu.addr).await?;
    assert!(
        stays_silent(&mut during, 300 * MS).await?,
        "new connection got through"
    );

    emu.control.restore();
    assert!(
        is_broken(&mut active).await?,
        "held connection not reset on restore"
    );
    assert!(
        is_broken(&mut during).await?,
        "held connection not reset on restore"
    );
    let mut fresh = TcpStream::connect(emu.addr).await?;
    ping(&mut fresh).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_profile_change_applies_to_open_connections() -> Result<()> {
    let emu = emulator(echo_server().await?, LinkProfile::ideal()).await?;
    let mut stream = TcpStream::connect(emu.addr).await?;
    ping(&mut stream).await?;

    let slow = LinkProfile::delay(60 * MS);
    emu.control.set_profile(slow, slow)?;
    assert_eq!(emu.control.profiles(), (slow, slow));
    let rtt = ping(&mut stream).await?;
    assert!(rtt >= 120 * MS, "rtt {rtt:?} after raising the delay");

    let bad = LinkProfile::ideal().with_bandwidth(Some(0));
    assert!(emu.control.set_profile(bad, slow).is_err());
    assert_eq!(emu.control.profiles(), (slow, slow));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_resets_the_client() -> Result<()> {
    // Bound but never listening (and kept alive, so the emulator cannot be given the port):
    // connecting is refused.
    let dead_socket = tokio::net::TcpSocket::new_v4()?;
    dead_socket.bind("127.0.0.1:0".parse()?)?;
    let dead = dead_socket.local_addr()?;
    let emu = emulator(dead, LinkProfile::ideal()).await?;
    assert!(turned_away(emu.addr).await?);
    assert_eq!(emu.control.stats().upstream_connect_failures, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_connections_and_ends_the_task() -> Result<()> {
    let mut emu = emulator(echo_server().await?, LinkProfile::delay(MS)).await?;
    let mut stream = TcpStream::connect(emu.addr).await?;
    ping(&mut stream).await?;
    let _ = emu.stop.take().context("stop sender")?.send(());
    timeout(DEADLINE, &mut emu.task).await??;
    assert!(is_broken(&mut stream).await?);
    assert!(
        TcpStream::connect(emu.addr).await.is_err(),
        "listener still open"
    );
    Ok(())
}

#[tokio::test]
async fn spawn_rejects_an_invalid_config() -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let upstream = listener.local_addr()?;
    let config = LinkConfig::symmetric(LinkProfile::ideal().with_bandwidth(Some(0)));
    assert!(LinkEmulator::spawn(listener, upstream, config, std::future::pending()).is_err());
    Ok(())
}
