fn main() -> anyhow::Result<()> {
    let dp = lb::datapath::Datapath::load(1024)?;
    println!("loaded, max_flows {}", dp.max_flows());
    Ok(())
}
