//! `certs-handshake`: full mutual TLS 1.3 handshakes per second over
//! loopback with Sluice's configs (SPIFFE verifiers, certificate chosen by
//! SNI), against a plain rustls client/server pair in the style of rustls's
//! own examples (WebPKI verifiers, one certificate each, DNS name check), with
//! the same P-256 keys, crypto provider and TLS settings, in the same run.
//! Each handshake ends with a one-byte exchange, so the server has verified
//! the client certificate. No resumption: every handshake is a full one.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::Arc,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use certs::{Ca, CaOptions, IdentityManager, IdentityOptions, SharedClock, SpiffeId, SystemClock};
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned,
    client::Resumption, server::WebPkiClientVerifier,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

use crate::{
    pin::{pin_current_thread, unpin_current_thread},
    report::{Section, ratio},
};

struct Pair {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    name: ServerName<'static>,
}

fn sluice_pair(rt: &tokio::runtime::Runtime) -> Result<(Pair, Arc<Ca>)> {
    let clock: SharedClock = Arc::new(SystemClock);
    let ca = Arc::new(Ca::generate(CaOptions::default(), clock.clone())?);
    let src = SpiffeId::new("cluster.local", "shop", "cart")?;
    let dst = SpiffeId::new("cluster.local", "bank", "payments")?;
    let a = IdentityManager::new(
        ca.clone(),
        ca.bundle(),
        clock.clone(),
        IdentityOptions::default(),
    );
    let b = IdentityManager::new(ca.clone(), ca.bundle(), clock, IdentityOptions::default());
    rt.block_on(async {
        a.add(src.clone()).await?;
        // The server holds several identities, as an inbound proxy does.
        b.set_identities(
            (0..50)
                .map(|i| SpiffeId::new("cluster.local", "bank", &format!("other{i}")).unwrap())
                .chain([dst.clone()]),
        )
        .await?;
        anyhow::Ok(())
    })?;
    Ok((
        Pair {
            client: a.client_config(&src, &dst)?,
            server: b.server_config(),
            name: certs::server_name(&dst),
        },
        ca,
    ))
}

/// A P-256 leaf with a DNS name, from the same CA.
fn plain_leaf(
    ca: &Ca,
    dns: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let (chain, key) = ca.issue_serving_certificate(&[dns], &[])?;
    Ok((chain, key))
}

fn plain_client_leaf(ca: &Ca) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    // Client auth needs the clientAuth EKU: a workload certificate has both.
    let id = SpiffeId::new("cluster.local", "shop", "cart")?;
    let key = certs::ca::generate_workload_key()?;
    let issued = ca.sign_csr(&certs::ca::csr_for(&id, &key)?, &id)?;
    Ok((
        issued.chain,
        PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
    ))
}

fn rustls_pair(ca: &Ca) -> Result<Pair> {
    let provider = certs::provider();
    let mut roots = RootCertStore::empty();
    for r in ca.bundle().roots() {
        roots.add(r.clone())?;
    }
    let roots = Arc::new(roots);
    let (server_chain, server_key) = plain_leaf(ca, "server.test")?;
    let (client_chain, client_key) = plain_client_leaf(ca)?;
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(server_chain, server_key)?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server.send_tls13_tickets = 0;
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(client_chain, client_key)?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    client.resumption = Resumption::disabled();
    Ok(Pair {
        client: Arc::new(client),
        server: Arc::new(server),
        name: ServerName::try_from("server.test")?.to_owned(),
    })
}

/// `n` sequential handshakes; client and server threads pinned to `cpu`
/// when given. Returns handshakes per second.
fn measure(pair: &Pair, n: usize, cpu: Option<usize>) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server_cfg = pair.server.clone();
    let server = std::thread::spawn(move || -> Result<()> {
        if let Some(c) = cpu {
            pin_current_thread(c);
        }
        for _ in 0..n {
            let (tcp, _) = listener.accept()?;
            tcp.set_nodelay(true)?;
            let mut tls = StreamOwned::new(ServerConnection::new(server_cfg.clone())?, tcp);
            let mut b = [0u8; 1];
            tls.read_exact(&mut b)?;
            tls.write_all(&b)?;
            tls.flush()?;
        }
        Ok(())
    });
    if let Some(c) = cpu {
        pin_current_thread(c);
    }
    let start = Instant::now();
    for _ in 0..n {
        let tcp = TcpStream::connect(addr)?;
        tcp.set_nodelay(true)?;
        let mut tls = StreamOwned::new(
            ClientConnection::new(pair.client.clone(), pair.name.clone())?,
            tcp,
        );
        tls.write_all(b"x")?;
        tls.flush()?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).context("handshake or echo failed")?;
        if &b != b"x" {
            bail!("echo mismatch");
        }
    }
    let took = start.elapsed();
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    Ok(n as f64 / took.as_secs_f64())
}

pub fn run(quick: bool) -> Result<()> {
    let n = if quick { 300 } else { 3000 };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (sluice, ca) = sluice_pair(&rt)?;
    let plain = rustls_pair(&ca)?;
    // Warm-up both, then alternate so drift hits both alike.
    measure(&plain, n / 10, Some(0))?;
    measure(&sluice, n / 10, Some(0))?;
    let mut rows = Vec::new();
    for (label, cpu) in [
        ("one core (client and server pinned to CPU 0)", Some(0)),
        ("unpinned (2 vCPUs)", None),
    ] {
        unpin_current_thread();
        let mut base = 0.0;
        let mut ours = 0.0;
        for _ in 0..2 {
            base += measure(&plain, n / 2, cpu)?;
            ours += measure(&sluice, n / 2, cpu)?;
        }
        let (base, ours) = (base / 2.0, ours / 2.0);
        rows.push(vec![
            label.to_string(),
            format!("{base:.0}"),
            format!("{ours:.0}"),
            ratio(ours, base),
        ]);
    }
    unpin_current_thread();
    let mut s = Section::new("certs-handshake", "Mutual TLS 1.3 handshakes (certs)");
    s.line(format!(
        "Full TLS 1.3 handshakes with client certificates over loopback, ECDSA P-256 leaves from \
         one CA, ring provider, ALPN h2, no resumption, {n} handshakes per cell{}. Baseline: a plain \
         rustls client/server (WebPKI verifiers, DNS name check). Sluice: `IdentityManager` configs \
         (SPIFFE verifiers on both sides, server certificate chosen by SNI among 51 identities). \
         Each connection sends one byte and gets it back.\n",
        if quick { " (--quick)" } else { "" }
    ));
    s.line(format!(
        "Load average at the end of the run: {} (other work on the machine shows here).\n",
        crate::pin::load_average()
    ));
    s.table(
        &[
            "placement",
            "rustls handshakes/s",
            "Sluice handshakes/s",
            "Sluice ÷ rustls",
        ],
        &rows,
    );
    s.write()
}
