//! Quality cost of quantized KV blocks (`kv_bits` 8 and 4) on a model (default: the default
//! model).
//!
//! ```text
//! cargo run --release -p engine-mlx --example kv_quality --config <mlx cargo config> -- \
//!     [MODEL] [--blocks N] [--score M]
//! ```
//! A fixed English text (public-domain: the opening of *Pride and Prejudice* and of *Alice's
//! Adventures in Wonderland*) is tokenized with the model's tokenizer. For each KV storage
//! (float, 8-bit, 4-bit; the engine is loaded once per setting), the first `N` whole blocks
//! (default 3, 768 tokens at 256 per block) are prefilled in block-aligned chunks, exported,
//! and imported into a fresh sequence; then the next `M` tokens (default 256) are fed one at a
//! time, and each position's next-token distribution is read. Float blocks are bit-exact, so
//! the float row equals a cold run. Printed per setting: bytes per block, perplexity of the
//! text's actual next tokens, and against float: mean and max KL(float ‖ quantized) in nats,
//! top-1 agreement, and the mean and max over positions of the largest absolute logit change.

use agent_session::{BlockMeta, InferenceEngine, KvBlock, TokenId};
use block_pool::BlockHash;
use engine_mlx::{EngineConfig, MlxEngine};
use std::sync::Arc;
use std::time::Instant;

/// The text: the first chapter of *Pride and Prejudice* (Jane Austen, 1813) and the opening
/// of *Alice's Adventures in Wonderland* (Lewis Carroll, 1865), both in the public domain.
const TEXT: &str = "\
It is a truth universally acknowledged, that a single man in possession of a good fortune, \
must be in want of a wife.

However little known the feelings or views of such a man may be on his first entering a \
neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he \
is considered the rightful property of some one or other of their daughters.

\"My dear Mr. Bennet,\" said his lady to him one day, \"have you heard that Netherfield Park is \
let at last?\"

Mr. Bennet replied that he had not.

\"But it is,\" returned she; \"for Mrs. Long has just been here, and she told me all about it.\"

Mr. Bennet made no answer.

\"Do you not want to know who has taken it?\" cried his wife impatiently.

\"You want to tell me, and I have no objection to hearing it.\"

This was invitation enough.

\"Why, my dear, you must know, Mrs. Long says that Netherfield is taken by a young man of large \
fortune from the north of England; that he came down on Monday in a chaise and four to see the \
place, and was so much delighted with it, that he agreed with Mr. Morris immediately; that he \
is to take possession before Michaelmas, and some of his servants are to be in the house by the \
end of next week.\"

\"What is his name?\"

\"Bingley.\"

\"Is he married or single?\"

\"Oh! Single, my dear, to be sure! A single man of large fortune; four or five thousand a year. \
What a fine thing for our girls!\"

\"How so? How can it affect them?\"

\"My dear Mr. Bennet,\" replied his wife, \"how can you be so tiresome! You must know that I am \
thinking of his marrying one of them.\"

\"Is that his design in settling here?\"

\"Design! Nonsense, how can you talk so! But it is very likely that he may fall in love with \
one of them, and therefore you must visit him as soon as he comes.\"

\"I see no occasion for that. You and the girls may go, or you may send them by themselves, \
which perhaps will be still better, for as you are as handsome as any of them, Mr. Bingley may \
like you the best of the party.\"

\"My dear, you flatter me. I certainly have had my share of beauty, but I do not pretend to be \
anything extraordinary now. When a woman has five grown-up daughters, she ought to give over \
thinking of her own beauty.\"

\"In such cases, a woman has not often much beauty to think of.\"

\"But, my dear, you must indeed go and see Mr. Bingley when he comes into the neighbourhood.\"

\"It is more than I engage for, I assure you.\"

\"But consider your daughters. Only think what an establishment it would be for one of them. \
Sir William and Lady Lucas are determined to go, merely on that account, for in general, you \
know, they visit no newcomers. Indeed you must go, for it will be impossible for us to visit \
him if you do not.\"

\"You are over-scrupulous, surely. I dare say Mr. Bingley will be very glad to see you; and I \
will send a few lines by you to assure him of my hearty consent to his marrying whichever he \
chooses of the girls; though I must throw in a good word for my little Lizzy.\"

\"I desire you will do no such thing. Lizzy is not a bit better than the others; and I am sure \
she is not half so handsome as Jane, nor half so good-humoured as Lydia. But you are always \
giving her the preference.\"

\"They have none of them much to recommend them,\" replied he; \"they are all silly and \
ignorant like other girls; but Lizzy has something more of quickness than her sisters.\"

\"Mr. Bennet, how can you abuse your own children in such a way? You take delight in vexing \
me. You have no compassion for my poor nerves.\"

\"You mistake me, my dear. I have a high respect for your nerves. They are my old friends. I \
have heard you mention them with consideration these last twenty years at least.\"

\"Ah, you do not know what I suffer.\"

\"But I hope you will get over it, and live to see many young men of four thousand a year come \
into the neighbourhood.\"

\"It will be no use to us, if twenty such should come, since you will not visit them.\"

\"Depend upon it, my dear, that when there are twenty, I will visit them all.\"

Mr. Bennet was so odd a mixture of quick parts, sarcastic humour, reserve, and caprice, that \
the experience of three-and-twenty years had been insufficient to make his wife understand his \
character. Her mind was less difficult to develop. She was a woman of mean understanding, \
little information, and uncertain temper. When she was discontented, she fancied herself \
nervous. The business of her life was to get her daughters married; its solace was visiting \
and news.

Alice was beginning to get very tired of sitting by her sister on the bank, and of having \
nothing to do: once or twice she had peeped into the book her sister was reading, but it had \
no pictures or conversations in it, \"and what is the use of a book,\" thought Alice \"without \
pictures or conversations?\"

So she was considering in her own mind (as well as she could, for the hot day made her feel \
very sleepy and stupid), whether the pleasure of making a daisy-chain would be worth the \
trouble of getting up and picking the daisies, when suddenly a White Rabbit with pink eyes ran \
close by her.

There was nothing so very remarkable in that; nor did Alice think it so very much out of the \
way to hear the Rabbit say to itself, \"Oh dear! Oh dear! I shall be late!\" (when she thought \
it over afterwards, it occurred to her that she ought to have wondered at this, but at the \
time it all seemed quite natural); but when the Rabbit actually took a watch out of its \
waistcoat-pocket, and looked at it, and then hurried on, Alice started to her feet, for it \
flashed across her mind that she had never before seen a rabbit with either a \
waistcoat-pocket, or a watch to take out of it, and burning with curiosity, she ran across \
the field after it, and fortunately was just in time to see it pop down a large rabbit-hole \
under the hedge.

In another moment down went Alice after it, never once considering how in the world she was \
to get out again.

The rabbit-hole went straight on like a tunnel for some way, and then dipped suddenly down, so \
suddenly that Alice had not a moment to think about stopping herself before she found herself \
falling down a very deep well.
";

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

/// `log softmax(logits)` in f64.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = f64::from(logits.iter().copied().fold(f32::NEG_INFINITY, f32::max));
    let sum: f64 = logits.iter().map(|&x| (f64::from(x) - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&x| f64::from(x) - lse).collect()
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
            if x > best.1 {
                (i, x)
            } else {
                best
            }
        })
        .0
}

/// What one KV setting gave.
struct Run {
    label: &'static str,
    block_bytes: usize,
    /// Per scored position: the logits.
    logits: Vec<Vec<f32>>,
}

/// Prefills `tokens[..blocks * bt]` in block-aligned chunks, exports the blocks with the
/// engine's `kv_bits`, imports them into a fresh sequence, then feeds `score` more tokens one
/// at a time and returns each position's logits (predicting `tokens[n + i + 1]`).
async fn run(
    engine: &MlxEngine,
    tokens: &[TokenId],
    blocks: usize,
    score: usize,
) -> AnyResult<(usize, Vec<Vec<f32>>)> {
    let bt = engine.model().spec.block_tokens() as usize;
    let n = blocks * bt;
    let cold = engine.open_sequence().await?;
    for chunk in tokens[..n].chunks(bt) {
        engine.prefill(cold, chunk.to_vec()).await?;
    }
    let payloads = engine.export_blocks(cold, 0, blocks).await?;
    engine.release(cold).await?;
    let block_bytes = payloads.first().map_or(0, |p| p.byte_len());
    let fp = engine.model().fingerprint.clone();
    let mut parent: Option<BlockHash> = None;
    let mut restored = Vec::with_capacity(blocks);
    for (i, payload) in payloads.into_iter().enumerate() {
        let ids = tokens[i * bt..(i + 1) * bt].to_vec();
        let hash = BlockHash::chain(parent.as_ref(), &ids, &fp, "kv-quality");
        restored.push(Arc::new(KvBlock {
            meta: BlockMeta {
                hash,
                parent,
                token_ids: ids,
                model_fingerprint: fp.clone(),
            },
            payload,
        }));
        parent = Some(hash);
    }
    let warm = engine.open_sequence().await?;
    engine.import_blocks(warm, restored).await?;
    let mut out = Vec::with_capacity(score);
    for &t in &tokens[n..n + score] {
        engine.prefill(warm, vec![t]).await?;
        out.push(engine.debug_logits(warm).await?);
    }
    engine.release(warm).await?;
    Ok((block_bytes, out))
}

fn main() -> AnyResult<()> {
    // Same BLAS kernels as the server (see engine_mlx::blas).
    engine_mlx::blas::reexec_with_native_kernels()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |f: &str| {
        args.iter()
            .position(|a| a == f)
            .and_then(|i| args.get(i + 1))
            .and_then(|s| s.parse::<usize>().ok())
    };
    let blocks = value("--blocks").unwrap_or(3);
    let score = value("--score").unwrap_or(256);
    let model = args
        .first()
        .filter(|a| !a.starts_with("--"))
        .cloned()
        .unwrap_or_else(|| {
            let home = std::env::var("SEMANTIC_HOME").unwrap_or_else(|_| {
                format!("{}/.semantic", std::env::var("HOME").unwrap_or_default())
            });
            format!("{home}/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });

    let mut runs: Vec<Run> = Vec::new();
    let mut tokens: Vec<TokenId> = Vec::new();
    let mut prefix = 0usize;
    for (label, kv_bits) in [("float", None), ("8-bit", Some(8)), ("4-bit", Some(4))] {
        let t = Instant::now();
        let config = EngineConfig {
            kv_bits,
            ..EngineConfig::default()
        };
        let (engine, fmt) = MlxEngine::load(&model, config)?;
        if tokens.is_empty() {
            tokens = agent_session::ChatFormatter::encode(fmt.as_ref(), TEXT)?;
            prefix = blocks * engine.model().spec.block_tokens() as usize;
            let need = prefix + score + 1;
            println!(
                "model {}; text: {} tokens; restored prefix: {prefix} tokens ({blocks} blocks); \
                 scored: the next {score}",
                engine.model().id,
                tokens.len(),
            );
            if tokens.len() < need {
                return Err(format!("the text has {} tokens, {need} needed", tokens.len()).into());
            }
        }
        let (block_bytes, logits) =
            futures::executor::block_on(run(&engine, &tokens, blocks, score))?;
        println!(
            "{label}: {block_bytes} B per block, {:.1} s",
            t.elapsed().as_secs_f64()
        );
        runs.push(Run {
            label,
            block_bytes,
            logits,
        });
    }

    // Position i has seen tokens[..prefix + i + 1] and predicts tokens[prefix + i + 1].
    let reference = &runs[0].logits;
    let reference_lp: Vec<Vec<f64>> = reference.iter().map(|l| log_softmax(l)).collect();
    println!();
    println!(
        "| KV | bytes/block | perplexity | mean KL (nats) | max KL | top-1 agreement | \
         max abs Δlogit, mean / max |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &runs {
        let mut nll = 0.0;
        let (mut kl_sum, mut kl_max, mut agree) = (0.0f64, 0.0f64, 0usize);
        let (mut dl_sum, mut dl_max) = (0.0f64, 0.0f64);
        for (i, ((logits, ref_logits), ref_lp)) in r
            .logits
            .iter()
            .zip(reference)
            .zip(&reference_lp)
            .enumerate()
        {
            let lp = log_softmax(logits);
            let target = tokens[prefix + i + 1] as usize;
            nll -= lp.get(target).copied().unwrap_or(f64::NEG_INFINITY);
            let kl: f64 = ref_lp
                .iter()
                .zip(&lp)
                .map(|(&p, &q)| p.exp() * (p - q))
                .sum();
            kl_sum += kl;
            kl_max = kl_max.max(kl);
            if argmax(ref_logits) == argmax(logits) {
                agree += 1;
            }
            let dl = ref_logits
                .iter()
                .zip(logits)
                .map(|(a, b)| f64::from((a - b).abs()))
                .fold(0.0, f64::max);
            dl_sum += dl;
            dl_max = dl_max.max(dl);
        }
        let m = r.logits.len().max(1) as f64;
        println!(
            "| {} | {} | {:.3} | {:.2e} | {:.2e} | {:.1} % ({agree}/{}) | {:.3} / {:.3} |",
            r.label,
            r.block_bytes,
            (nll / m).exp(),
            kl_sum / m,
            kl_max,
            agree as f64 / m * 100.0,
            r.logits.len(),
            dl_sum / m,
            dl_max
        );
    }
    Ok(())
}
