//! Certificates made in the test (rcgen): a CA, a server certificate for
//! `localhost` and 127.0.0.1, and client certificates with a chosen CN.
//! Nothing secret is checked in.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

pub struct Pki {
    pub dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
    /// The CA certificate (PEM file).
    pub ca_file: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

/// A certificate and its key, as PEM files.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().expect("pki dir");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = params.self_signed(&ca_key).expect("CA cert");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).expect("write CA");
        let mut pki = Pki {
            server_cert: PathBuf::new(),
            server_key: PathBuf::new(),
            dir,
            ca,
            ca_key,
            ca_file,
        };
        let server = pki.issue("localhost", true);
        pki.server_cert = server.cert;
        pki.server_key = server.key;
        pki
    }

    /// A certificate for `cn`: a server one (SANs localhost and 127.0.0.1)
    /// or a client one.
    pub fn issue(&self, cn: &str, server: bool) -> Issued {
        let key = KeyPair::generate().expect("key");
        let names = if server {
            vec!["localhost".to_string()]
        } else {
            Vec::new()
        };
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        if server {
            params
                .subject_alt_names
                .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        } else {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("sign");
        let stem = format!("{}-{cn}", if server { "server" } else { "client" });
        let issued = Issued {
            cert: self.dir.path().join(format!("{stem}.pem")),
            key: self.dir.path().join(format!("{stem}.key")),
        };
        std::fs::write(&issued.cert, cert.pem()).expect("write cert");
        std::fs::write(&issued.key, key.serialize_pem()).expect("write key");
        issued
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// An HTTPS client that trusts this CA only.
    pub fn https_client(&self) -> reqwest::Client {
        let pem = std::fs::read(&self.ca_file).expect("read CA");
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("CA pem"))
            .build()
            .expect("https client")
    }

    /// A rustls client config for MQTT over TLS that trusts this CA, with a
    /// client certificate when given.
    pub fn mqtt_tls(&self, client: Option<&Issued>) -> std::sync::Arc<rustls::ClientConfig> {
        weir::tls::client_config(
            Some(&self.ca_file),
            client.map(|c| c.cert.as_path()),
            client.map(|c| c.key.as_path()),
        )
        .expect("client TLS config")
    }
}
