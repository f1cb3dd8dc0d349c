//! `usher-test-server [--port P] [--name NAME]`: the instance of the end-to-end tests and the
//! quickstart (the port also comes from `PORT`, as the agent sets it); what it answers is in
//! `usher_tests::instance`.
#![forbid(unsafe_code)]

use tokio::net::TcpListener;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut port: Option<u16> = std::env::var("PORT").ok().and_then(|p| p.parse().ok());
    let mut name: Option<String> = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => port = args.next().and_then(|p| p.parse().ok()),
            "--name" => name = args.next(),
            other => anyhow::bail!(
                "unknown argument {other:?}; usage: usher-test-server [--port P] [--name NAME]"
            ),
        }
    }
    let port = port.ok_or_else(|| anyhow::anyhow!("no port: pass --port or set PORT"))?;
    let name = name.unwrap_or_else(|| format!("instance-{port}"));
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    usher_tests::instance::serve(listener, name).await?;
    Ok(())
}
