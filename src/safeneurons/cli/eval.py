"""`safeneurons eval`: attack success rate, refusal rate and perplexity."""
from __future__ import annotations

import argparse
import logging

from safeneurons.errors import SafeneuronsError
from safeneurons.evaluation.evaluate import FLAGS, EvalConfig, run_eval
from safeneurons.evaluation.metrics import DEFAULT_HARMFUL_LIMIT, DEFAULT_MAX_NEW_TOKENS
from safeneurons.models.loading import ModelSource

log = logging.getLogger(__name__)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from safeneurons.cli.options import add_model_arguments, add_run_arguments, add_shard_argument

    add_model_arguments(parser)  # --deepspeed ZeRO-3 config: the model partitioned, generation in lock-step
    add_shard_argument(parser)  # --shard layers: generation and perplexity pipelined through the ranks' blocks
    add_run_arguments(parser)
    parser.add_argument("--harmful-data", "--prompts", dest="prompts", default="advbench",
                        help="harmful prompts: a data set name or file (default %(default)s)")
    parser.add_argument("--eval-limit", "--limit", dest="limit", type=int, default=DEFAULT_HARMFUL_LIMIT,
                        help="use the first N harmful prompts (default %(default)s; 0 = all)")
    parser.add_argument("--harmless-data", "--harmless", dest="harmless", help="harmless prompts (over-refusal)")
    parser.add_argument("--harmless-limit", type=int, default=0,
                        help="use the first N harmless prompts (default %(default)s = all)")
    parser.add_argument("--perplexity-data", default=None,
                        help="text set for perplexity (prompt/response data: the responses are scored)")
    parser.add_argument("--perplexity-samples", type=int, default=100,
                        help="texts drawn with --seed for perplexity (default %(default)s; 0 = all)")
    decoding = parser.add_argument_group("decoding (the original work's ASR variants: greedy with --system-prompt "
                                         "default or none; sampled with --n-samples 5 --temperature 1)")
    decoding.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                          help="new tokens per generation (default %(default)s)")
    decoding.add_argument("--system-prompt", default="none", metavar="none|default|TEXT",
                          help="system message of every prompt: none, default (Llama-2's default system prompt, "
                               "as the original's ASR_basic) or the text itself (default %(default)s)")
    decoding.add_argument("--n-samples", type=int, default=1,
                          help="generations per prompt; a prompt counts as attacked if any of them is "
                               "(default %(default)s)")
    decoding.add_argument("--temperature", type=float, default=0.0,
                          help="sampling temperature, 0 = greedy (default %(default)s); sampling draws from --seed")
    judges = parser.add_argument_group("judges (see safeneurons.judges)")
    judges.add_argument("--judge", default="keyword",
                        help="comma-separated judges of the harmful generations: keyword (the original's refusal "
                             "substrings and >= 20 words), harmbench, llamaguard, strongreject (default %(default)s)")
    judges.add_argument("--judge-model", action="append", default=[], metavar="[JUDGE=]MODEL",
                        help="the classifier of the model judges (HF id, folder, or demo-judge); JUDGE=MODEL for one "
                             "judge; repeat for several")
    over_refusal = parser.add_argument_group("over-refusal and utility")
    over_refusal.add_argument("--xstest", default=None, metavar="CSV",
                              help="an XSTest file (prompt, type, label): refusal rate on its safe prompts, "
                                   "compliance on its unsafe ones")
    over_refusal.add_argument("--lm-eval-tasks", default=None, metavar="TASKS",
                              help="zero-shot accuracy through lm-eval (pip install 'safeneurons[eval]'): "
                                   "comma-separated tasks, or original (boolq,rte,hellaswag,winogrande,arc_easy,"
                                   "arc_challenge,openbookqa)")
    over_refusal.add_argument("--lm-eval-limit", type=int, default=None, help="examples per lm-eval task (all)")
    over_refusal.add_argument("--lm-eval-include", default=None, metavar="DIR",
                              help="a folder of lm-eval task YAML files (local tasks)")
    _add_batch_arguments(parser)
    _add_neuron_patching_arguments(parser)


def _add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    from safeneurons.cli.options import add_eos_argument

    parser.add_argument("--eval-batch-size", "--batch-size", dest="batch_size", type=int, default=16,
                        help="prompts per generation batch (default %(default)s)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per perplexity text (default %(default)s)")
    add_eos_argument(parser)


def _add_neuron_patching_arguments(parser: argparse.ArgumentParser) -> None:
    from safeneurons.cli.options import add_neuron_arguments

    neurons = parser.add_argument_group("dynamic neuron patching (Chen et al. 2024)")
    neurons.add_argument("--patch-neurons-from", default=None, metavar="MODEL",
                         help="at every generated token the chosen MLP neurons take this model's values on the same "
                              "prefix (same structure and tokenizer), e.g. demo-chat into --model demo-base")
    add_neuron_arguments(neurons)


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    from safeneurons.evaluation.utility import parse_tasks

    for option in ("limit", "harmless_limit", "perplexity_samples"):
        if getattr(args, option) < 0:
            raise SafeneuronsError(f"{FLAGS[option]}={getattr(args, option)} must be >= 0 (0 = all)")
    config = EvalConfig(prompts=args.prompts, limit=args.limit or None, harmless=args.harmless,
                        harmless_limit=args.harmless_limit or None, perplexity_data=args.perplexity_data,
                        perplexity_samples=args.perplexity_samples or None, max_new_tokens=args.max_new_tokens,
                        batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                        data_dir=args.data_dir, system_prompt=args.system_prompt, n_samples=args.n_samples,
                        temperature=args.temperature, add_eos=args.add_eos,
                        judges=tuple(name.strip() for name in args.judge.split(",") if name.strip()),
                        judge_models=tuple(args.judge_model), xstest=args.xstest,
                        lm_eval_tasks=parse_tasks(args.lm_eval_tasks) if args.lm_eval_tasks is not None else (),
                        lm_eval_limit=args.lm_eval_limit, lm_eval_include=args.lm_eval_include,
                        patch_neurons_from=args.patch_neurons_from, neurons=tuple(args.neurons),
                        neuron_rule=args.neuron_rule)
    config.validate()
    return config


def run(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    result = run_eval(ModelSource(args.model, args.dtype, args.deepspeed, args.cache_dir, args.shard, args.stages),
                      config, args.out)
    if result is not None:
        print(result.summary_line(config.n_samples))
