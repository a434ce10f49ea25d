//! `epu-controller --config FILE`: hosts the domains of one run.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    epu_controller::process::main_with(decision_engines::Registry::with_builtins()).await
}
