//! A download cut mid-file continues with `Range`: a loopback proxy in front of a real Hearth
//! drops the connection after a number of response bytes, first during the gzip download,
//! then during the identity download that resumes it.

use std::sync::{Arc, Mutex};

use hearth_client::export;
use hearth_client::{BulkClient, ClientOptions, ExportJob, ExportRequest, Level};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::helpers::*;

/// What the proxy does and saw.
#[derive(Default)]
struct ProxyState {
    /// Response byte budgets for the next file downloads, in order: each download that
    /// starts takes the next one and is cut after that many bytes.
    cuts: Vec<usize>,
    /// The `Range` header of every file request, `None` for a request without one.
    ranges: Vec<Option<String>>,
    /// Downloads actually cut.
    cut: usize,
}

/// Forwards loopback connections to `upstream`, cutting file downloads per `state`.
async fn run_proxy(
    listener: TcpListener,
    upstream: std::net::SocketAddr,
    state: Arc<Mutex<ProxyState>>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            return;
        };
        let Ok(server) = TcpStream::connect(upstream).await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            // The response budget of the request in flight on this connection, if it is a
            // download to cut. Requests on one connection are sequential (no pipelining), so
            // the bytes that follow a request are its response.
            let budget: Arc<Mutex<Option<usize>>> = Arc::new(Mutex::new(None));
            let upstream_budget = budget.clone();
            let requests = tokio::spawn(async move {
                let mut buffer = vec![0u8; 16 * 1024];
                loop {
                    let n = match client_read.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let text = String::from_utf8_lossy(&buffer[..n]);
                    if text.starts_with("GET /fhir/Binary/") {
                        let range = text
                            .lines()
                            .find(|l| l.to_ascii_lowercase().starts_with("range:"))
                            .map(|l| l["range:".len()..].trim().to_owned());
                        let mut state = state.lock().unwrap();
                        state.ranges.push(range);
                        let next = if state.cuts.is_empty() {
                            None
                        } else {
                            state.cut += 1;
                            Some(state.cuts.remove(0))
                        };
                        *budget.lock().unwrap() = next;
                    }
                    if server_write.write_all(&buffer[..n]).await.is_err() {
                        break;
                    }
                }
            });
            let mut buffer = vec![0u8; 16 * 1024];
            loop {
                let n = match server_read.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let allowed = {
                    let mut budget = upstream_budget.lock().unwrap();
                    match budget.as_mut() {
                        Some(left) => {
                            let allowed = n.min(*left);
                            *left -= allowed;
                            Some(allowed)
                        }
                        None => None,
                    }
                };
                let (allowed, cut) = match allowed {
                    Some(allowed) => (
                        allowed,
                        allowed < n || *upstream_budget.lock().unwrap() == Some(0),
                    ),
                    None => (n, false),
                };
                if client_write.write_all(&buffer[..allowed]).await.is_err() {
                    break;
                }
                if cut {
                    // Drop both sides mid-response, as a broken network would.
                    break;
                }
            }
            requests.abort();
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_mid_file_resumes_with_range() {
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_base = format!("http://{}/fhir", proxy.local_addr().unwrap());
    let hearth = start_hearth(Some(proxy_base.clone())).await;
    let state = Arc::new(Mutex::new(ProxyState::default()));
    tokio::spawn(run_proxy(proxy, hearth.addr, state.clone()));

    // One file (Observation, about 1.1 MB; about 150 kB as gzip), one download at a time:
    // the first response (gzip) is cut after 40 kB, the resumed one (identity) after 300 kB.
    state.lock().unwrap().cuts = vec![40_000, 300_000];
    let out = TempDir::new().unwrap();
    let client = BulkClient::new(
        &proxy_base,
        ClientOptions {
            parallel: 1,
            ..fast_options()
        },
    )
    .unwrap();
    let mut request = ExportRequest::new(Level::System);
    request.types = vec!["Observation".into()];
    let job = ExportJob {
        request,
        out_dir: out.path().to_owned(),
        incremental: false,
        resume: None,
        release: false,
    };
    let recorder = Recorder::new();

    let summary = bounded(export::run(&client, &job, recorder.clone()))
        .await
        .expect("the export succeeds despite the cuts");

    // Two cuts, two resumes at growing offsets, each asked with a Range from that offset.
    let resumed: Vec<u64> = recorder
        .events()
        .iter()
        .filter_map(|e| match e {
            Event::Resumed(name, offset) if name == "Observation.1.ndjson" => Some(*offset),
            _ => None,
        })
        .collect();
    let (ranges, cut) = {
        let state = state.lock().unwrap();
        (state.ranges.clone(), state.cut)
    };
    assert_eq!(cut, 2);
    assert_eq!(resumed.len(), 2, "{:?}", recorder.events());
    assert!(resumed[0] > 0 && resumed[1] > resumed[0], "{resumed:?}");
    assert!(
        !recorder
            .events()
            .iter()
            .any(|e| matches!(e, Event::Restarted(_)))
    );
    assert_eq!(
        ranges,
        vec![
            None,
            Some(format!("bytes={}-", resumed[0])),
            Some(format!("bytes={}-", resumed[1])),
        ]
    );

    // The saved file is byte for byte what the server holds.
    let file = &summary.files[0];
    assert_eq!(file.retries, 2);
    let direct = hearth
        .http
        .get(file.url.replace(&proxy_base, &hearth.direct_base()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let saved = std::fs::read(&file.path).unwrap();
    assert_eq!(saved.len(), direct.len());
    assert!(
        saved == direct,
        "the resumed file differs from the server's"
    );
    assert_eq!(file.resources, synthea_ids("Observation").len() as u64);
    assert!(leftover_parts(out.path()).is_empty());
}
