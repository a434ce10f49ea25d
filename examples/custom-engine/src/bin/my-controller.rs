//! A controller binary that knows the `backlog_ratio` engine as well as the
//! built-in ones. Same command line as `epu-controller`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    epu_controller::process::main_with(custom_engine::registry()?).await
}
