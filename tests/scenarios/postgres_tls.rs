//! TLS to Postgres on rustls, against a real PostgreSQL serving a
//! certificate made in the test: `require` checks the server against
//! `ca_file` (and refuses a server it cannot check), `prefer` encrypts
//! without checking (libpq's prefer), `disable` does not encrypt; no error
//! shows the password.

use crate::common;

use common::pki::Pki;
use common::postgres::{Postgres, PASSWORD};
use weir::config::PgTls;

async fn encrypted(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_modes_do_what_they_say() {
    let pki = Pki::new("postgres");
    let pg = Postgres::start_tls(&pki.server_cert, &pki.server_key).await;
    let mut conn = pg.connection("backoffice");

    conn.tls = PgTls::Require;
    conn.ca_file = Some(pki.ca_file.clone());
    let client = weir::postgres::connect(&conn)
        .await
        .expect("require with the CA");
    assert!(encrypted(&client).await);

    conn.ca_file = None;
    let Err(refused) = weir::postgres::connect(&conn).await else {
        panic!("require without a CA that vouches for the server is refused");
    };
    assert!(refused.contains("backoffice"), "{refused}");
    assert!(!refused.contains(PASSWORD), "{refused}");

    conn.tls = PgTls::Prefer;
    let client = weir::postgres::connect(&conn).await.expect("prefer");
    assert!(encrypted(&client).await, "prefer did not encrypt");

    conn.tls = PgTls::Disable;
    let client = weir::postgres::connect(&conn).await.expect("disable");
    assert!(!encrypted(&client).await);

    // a wrong password: refused, and the error does not echo what was sent
    let wrong = pg.dir.path().join("wrong-password");
    std::fs::write(&wrong, "not-the-Password-42").expect("file");
    conn.password_file = Some(wrong);
    let Err(refused) = weir::postgres::connect(&conn).await else {
        panic!("a wrong password is refused");
    };
    assert!(
        refused.contains("password authentication failed"),
        "{refused}"
    );
    assert!(!refused.contains("not-the-Password-42"), "{refused}");
}
