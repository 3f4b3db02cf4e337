//! Measures generation time and the minority group's top-10 exposure (observed scores vs true
//! relevance) of the default synthetic dataset for several bias values.
//!
//! Run in release: `cargo run --release -p datasets --example bias_report -- [USERS] [BIAS...]`
//! (defaults: 1000 users, biases 0 0.05 0.1 0.2 0.3).

use std::time::Instant;

use datasets::{Scoring, SyntheticParams, generate, top_k_group_exposure};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let users: usize = match args.next() {
        Some(value) => value.parse()?,
        None => 1_000,
    };
    let mut biases: Vec<f64> = args.map(|value| value.parse()).collect::<Result<_, _>>()?;
    if biases.is_empty() {
        biases = vec![0.0, 0.05, 0.1, 0.2, 0.3];
    }
    let defaults = SyntheticParams::default();
    println!(
        "default dataset shape: {} items x {} dims, {} users, minority share {}, noise {}",
        defaults.items,
        defaults.dim,
        defaults.users,
        defaults.minority_share,
        defaults.observation_noise
    );
    println!("top-10 exposure share of the minority over the first {users} users (DCG weights)");
    println!(
        "{:>6}  {:>10}  {:>10}  {:>10}  {:>9}",
        "bias", "observed", "true", "ratio", "gen (s)"
    );
    for bias in biases {
        let params = SyntheticParams {
            bias,
            ..defaults.clone()
        };
        let started = Instant::now();
        let dataset = generate(&params)?;
        let generation = started.elapsed().as_secs_f64();
        let users = users.min(params.users);
        let observed = top_k_group_exposure(&dataset, Scoring::Observed, 10, 0..users)?;
        let truth = top_k_group_exposure(&dataset, Scoring::TrueRelevance, 10, 0..users)?;
        println!(
            "{bias:>6.3}  {:>10.4}  {:>10.4}  {:>10.3}  {generation:>9.3}",
            observed[1],
            truth[1],
            observed[1] / truth[1]
        );
    }
    Ok(())
}
