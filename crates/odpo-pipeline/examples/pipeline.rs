//! Runs the pipeline without the CLI: `cargo run --release -p odpo-pipeline --example pipeline -- default [--set k=v ...]`,
//! `... -- frontier configs/pipeline/frontier.toml [--set k=v ...]` or `... -- eval runs/default`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sets: Vec<String> = args.windows(2).filter(|w| w[0] == "--set").map(|w| w[1].clone()).collect();
    let device = odpo_model::backend::device("flex")?;
    match args.first().map(String::as_str) {
        Some("frontier") => {
            let path = args.get(1).ok_or("frontier needs a config file")?;
            odpo_pipeline::frontier(path.as_ref(), &sets, &device, true)?;
        }
        Some("eval") => {
            let dir = args.get(1).ok_or("eval needs a run folder")?;
            let r = odpo_pipeline::eval_run(dir.as_ref(), None, None, &device)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        _ => {
            odpo_pipeline::run_default(&odpo_pipeline::DefaultOptions { sets, verbose: true, ..Default::default() }, &device)?;
        }
    }
    Ok(())
}
