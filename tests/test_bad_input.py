"""Bad and hostile input, crashes and huge models (issue 17): the promises of docs/guides/auditing.md, one row per case.

Each row is a command, its exit code, a regex for the one line it may print
on stderr (None: a success), and whether the output folder may change: its
tree hash (every path, hidden ones included, and every byte) is taken before
and after.  An error must leave it unchanged and put exactly one line on
stderr.  Classes follow the issue: 1 memory, 2 publish, 3 streaming, 4 audit
JSON, 5 option/config values, 6 failures that write, 7 legitimate input,
8 bad input accepted, 9 one line; issue 28's 10: the Hub token and the
output tree; issue 27's 11: nothing silently replaced, 12: read-only output
folders, unicode and over-long paths, and 13 (``API_CASES``, a table of its
own): the Python API given wrong shapes, dtypes, NaN tensors and values.  Every row runs with a fake token in ``HF_TOKEN`` (``hf_`` + 34
random letters, made here) and the debug log on (``HF_RKSP_LOG``): neither
that token nor any token-shaped string may appear in stdout, stderr, the
debug log, a file the row wrote or changed under the output folder, or the
folder outside it that the symlink rows point to, which must not change.
The rows run in-process (main()); the kill-at-every-rename and
resume-after-kill tests use real process boundaries.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import interrupt_block, slug_of, tiny_config, tiny_tokenizer

from hf_rksp.cli.commands import main

SMALL = ("--tokens", "128", "--seq-len", "64", "-q")
SLUG = "{slug}"  # the slug of the good audit of the checkpoint folder "tok" (fx["slug"]), formatted in each row

#: a fake Hub token of the real shape, made fresh for each test session (the rows' HF_TOKEN)
FAKE_TOKEN = "hf_" + "".join(random.SystemRandom().choices(string.ascii_letters, k=34))
#: the shape of a token, written here independently of hf_rksp.utils.secrets
TOKEN_SHAPED = re.compile(rb"hf_[A-Za-z0-9]{30,}")


#: the one line of a refused token: the parameter as the CLI names it, never the value
TOKEN_LINE = r"{flag}: looks like a Hugging Face access token .*refused"
#: the one line of a refused symlink in the output tree
SYMLINK_LINE = r"out/{path} is a symbolic link: hf-rksp writes only real folders and files inside --out-dir"


@dataclass(frozen=True)
class Case:
    """One row: ``argv`` is formatted with the fixture paths ({tok}, {out}, ...)."""

    id: str
    cls: int
    argv: tuple[str, ...]
    code: int
    line: str | None  # regex of the one stderr line; None: success
    writes: bool = False  # the output folder may change
    setup: str | None = None  # a fault injected before the command (see SETUPS)
    prefill: bool = True  # an earlier audit of the same slug is in the output folder
    cwd: str | None = None  # run in this fixture folder
    expect: tuple[str, ...] = ()  # paths under the output folder that must exist afterwards
    max_s: float | None = None  # the command (in-process: no interpreter start-up) fails within this many seconds


def audit(*args: str) -> tuple[str, ...]:
    return ("audit", *args, "--out-dir", "{out}")


STREAM = ("--stream", *SMALL)

CASES = [
    # 1. memory blow-ups are refused up front, with the numbers
    Case("huge-block-stream", 1, audit("--config", "{huge}", "--stream", *SMALL), 2,
         r"one block needs [\d.]+ GiB .*only 4\.0 GiB of RAM is available; use --dtype bfloat16, --device-map disk",
         setup="low_memory"),
    Case("huge-block-auto", 1, audit("--config", "{huge}", *SMALL), 2, r"one block needs [\d.]+ GiB",
         setup="low_memory"),
    Case("huge-block-bfloat16", 1, audit("--config", "{huge}", "--dtype", "bfloat16", *SMALL), 2,
         r"one block needs [\d.]+ GiB of weights in bfloat16", setup="low_memory"),
    Case("activations-of-many-tokens", 1, audit("gpt2", "--init", "--tokens", "8000000", "--seq-len", "1000", "-q"),
         2, r"activations of 8000000 tokens need [\d.]+ GiB.*smaller --tokens", setup="low_memory"),
    Case("big-text-few-tokens", 1, audit("{tok}", "--text", "{bigtext}", *SMALL), 0, None, writes=True,
         expect=("audits/{slug_text}/audit.json",)),
    # 2. publishing is all-or-nothing, and the next run completes a killed one
    Case("rename-fails-on-card", 2, audit("{tok}", *SMALL, "--seed", "3"), 2, r"Permission denied.*unchanged",
         setup="card_rename_fails"),
    Case("disk-full-while-staging", 2, audit("{tok}", *SMALL, "--seed", "3"), 2,
         r"no space left on device.*unchanged", setup="staging_enospc"),
    Case("from-audit-rename-fails", 2, audit("--from-audit", "{good}"), 2, r"Permission denied",
         setup="card_rename_fails"),
    Case("killed-publish-completed", 2, ("push", SLUG, "--repo-id", "a/b", "--dry-run", "--out-dir", "{out}"), 0,
         None, writes=True, setup="killed_publish"),
    # 3. the streaming path: one line, no traceback, nothing left
    Case("corrupt-header", 3, audit("{corrupt_header}", *STREAM), 2, r"not a valid safetensors file"),
    Case("bad-header-length", 3, audit("{bad_header_len}", *STREAM), 2, r"not a valid safetensors file"),
    Case("corrupt-index", 3, audit("{corrupt_index}", *STREAM), 2, r"not a valid safetensors index"),
    Case("index-without-weight-map", 3, audit("{no_weight_map}", *STREAM), 2, r"no valid weight_map"),
    Case("missing-shard", 3, audit("{missing_shard}", *STREAM), 2, r"shard .* is missing"),
    Case("shape-mismatch", 3, audit("{shape_mismatch}", *STREAM), 2, r"has shape \[.*expects \["),
    Case("out-dir-unwritable", 3, ("audit", "{tok}", *STREAM, "--out-dir", "/proc/self/hf-rksp-out"), 2,
         r"--out-dir .*cannot write", prefill=False),
    Case("out-dir-under-a-file", 3, ("audit", "{tok}", *STREAM, "--out-dir", "{afile}/sub"), 2,
         r"--out-dir .*not a directory", prefill=False),
    Case("disk-full-saving-progress", 3, audit("{tok}", *STREAM), 2, r"could not save the progress.*No space",
         setup="progress_enospc"),
    Case("tampered-progress", 3, audit("{tok}", *STREAM), 0, None, writes=True, setup="tampered_progress"),
    Case("progress-of-other-weights", 3, audit("{reweighted}", *STREAM), 0, None, writes=True,
         setup="weights_changed_after_interrupt", expect=("audits/{slug_reweighted}/audit.json",)),
    # 4. an audit.json that passes the schema (or nearly) must not crash any reader
    Case("nan", 4, audit("--from-audit", "{nan}"), 2, r"NaN, which JSON does not allow"),
    Case("infinity", 4, ("compare", "{good}", "{inf}"), 2, r"Infinity, which JSON does not allow"),
    Case("overflowing-float", 4, ("push", "{big}", "--repo-id", "a/b", "--dry-run"), 2, r"beyond float range"),
    Case("empty-timings", 4, audit("--from-audit", "{no_timings}"), 0, None, writes=True,
         expect=(f"audits/{SLUG}/audit.json",)),
    Case("no-risk-reason", 4, audit("--from-audit", "{no_reason}"), 0, None, writes=True),
    Case("risk-without-keys", 4, audit("--from-audit", "{bad_risk}"), 2, r"does not match schema .* at risk"),
    Case("deep-nesting", 4, ("compare", "{deep}", "{good}"), 2, r"not a valid JSON audit"),
    Case("not-utf8", 4, ("push", "{latin1}", "--repo-id", "a/b", "--dry-run"), 2, r"not a valid UTF-8"),
    Case("huge-list", 4, audit("--from-audit", "{huge_list}"), 2, r"^.{0,600}$"),
    Case("sparse-390-mb", 4, audit("--from-audit", "{sparse}"), 2,
         r"is 408944640 bytes, more than an audit file may be \(67108864 bytes, 64 MiB\): refused before reading"),
    Case("sparse-at-the-cap", 4, ("compare", "{at_cap}", "{good}"), 2, r"at_cap/audit\.json is not a valid JSON audit"),
    Case("eigenvalues-missing", 4, audit("--from-audit", "{no_eigs}"), 2, r"block 0 has m = \d+ but 0 eigenvalues"),
    Case("value-beyond-any-axis", 4, audit("--from-audit", "{huge_eta}", "--overwrite"), 0, None, writes=True),
    Case("slug-dotdot", 4, audit("--from-audit", "{slug_dotdot}"), 2, r"does not match schema .* at slug"),
    Case("compare-json-overflow", 4, ("compare", "{low}", "{high}", "--json"), 0, None),
    Case("compare-plot-to-a-dir", 4, ("compare", "{good}", "{good}", "--plot", "{out}"), 2, r"Is a directory"),
    # 5. option and config values, validated in one layer
    Case("device-toaster", 5, audit("{tok}", *SMALL, "--device", "toaster"), 2, r"--device: must be cpu"),
    Case("device-meta", 5, audit("{tok}", *SMALL, "--device", "meta"), 2, r"--device: must be cpu"),
    Case("lr-inf", 5, audit("{tok}", *SMALL, "--lr", "inf"), 2, r"--lr: must be a finite positive number"),
    Case("lr-nan", 5, audit("{tok}", *SMALL, "--lr", "nan"), 2, r"--lr: must be a finite positive number"),
    Case("tokens-1e11", 5, audit("{tok}", "--tokens", "100000000000", "-q"), 2, r"--tokens: must be between 2"),
    Case("seed-negative", 5, audit("{tok}", *SMALL, "--seed", "-1"), 2, r"--seed: must be between 0"),
    Case("batch-size-huge", 5, audit("{tok}", *SMALL, "--batch-size", "1000000000"), 2, r"--batch-size: must be"),
    Case("vocab-size-0", 5, audit("--config", "{vocab0}", *SMALL), 2, r"vocab_size must be a positive integer"),
    Case("n-positions-0", 5, audit("--config", "{npos0}", *SMALL), 2, r"(n_positions|max_position_embeddings) must be a positive integer"),
    Case("config-deeply-nested", 5, audit("--config", "{deep_cfg}", *SMALL), 2, r"is not valid JSON"),
    Case("config-1e8-layers", 5, audit("--config", "{many_layers}", *SMALL), 2,
         r"(num_hidden_layers|n_layer) must be a positive integer up to 4096"),
    Case("device-mps-absent", 5, audit("{tok}", *SMALL, "--device", "mps"), 2, r"no Apple MPS device"),
    # 6. failures that write nothing (and an interruption that says what it kept)
    Case("nan-at-block-1-streamed", 6, audit("{nan_ckpt}", *STREAM), 2, r"non-finite .* block 1"),
    Case("nan-at-block-1-fresh-out", 6, audit("{nan_ckpt}", *STREAM), 2, r"non-finite .* block 1", prefill=False),
    Case("write-fails-fresh-out", 6, audit("{tok}", *SMALL), 2, r"Permission denied", setup="card_rename_fails",
         prefill=False),
    Case("device-map-disk-init", 6, audit("{tok}", "--init", "--device-map", "disk", *SMALL), 2,
         r"--device-map .* place pretrained weights", setup="count_offload_dirs"),
    Case("interrupted-stream-keeps-progress", 6, audit("{tok}", *STREAM), 130,
         r"interrupted; progress kept in .*\.partial.*rerun the same command", writes=True, setup="interrupt"),
    Case("device-map-disk-pretrained", 6, audit("{tok}", "--device-map", "disk", *SMALL), 0, None, writes=True,
         setup="count_offload_dirs"),
    # 7. legitimate input that must work
    Case("audit-dot", 7, ("audit", ".", *SMALL, "--out-dir", "{out}"), 0, None, writes=True, cwd="tok",
         expect=(f"audits/{SLUG}/audit.json", f"model_cards/{SLUG}/README.md")),
    Case("trailing-slash", 7, audit("./tok/", *SMALL), 0, None, writes=True, cwd="root",
         expect=(f"audits/{SLUG}/audit.json",)),
    Case("name-org-model", 7, audit("{tok}", *SMALL, "--name", "org/tiny-model"), 0, None, writes=True,
         expect=("audits/{slug_name}/audit.json",)),
    Case("out-dir-is-a-link", 7, ("audit", "--from-audit", "{good}", "--out-dir", "{outlink}"), 0, None, writes=True,
         setup="link_out_dir", expect=(f"audits/{SLUG}/audit.json", f"model_cards/{SLUG}/README.md")),
    Case("new-out-dir-with-spaces", 7, ("audit", "{tok}", *SMALL, "--out-dir", "{out}/new dir/ü"), 0, None,
         writes=True, expect=(f"new dir/ü/audits/{SLUG}/audit.json",)),
    # 8. bad input that must be refused (a dry run predicts the real push)
    Case("push-bad-repo-id", 8, ("push", SLUG, "--repo-id", "a/b c", "--dry-run", "--out-dir", "{out}"), 2,
         r"--repo-id: must be a Hub repo id"),
    Case("push-bad-revision", 8, ("push", SLUG, "--repo-id", "a/b", "--revision", "x..y", "--dry-run",
                                  "--out-dir", "{out}"), 2, r"--revision: is not a valid branch"),
    Case("push-revision-newline", 8, ("push", SLUG, "--repo-id", "a/b", "--revision", "main\nx", "--dry-run",
                                      "--out-dir", "{out}"), 2, r"--revision: is not a valid branch"),
    Case("max-memory-lots", 8, audit("{tok}", *SMALL, "--device-map", "cpu", "--max-memory", "cpu=lots"), 2,
         r"--max-memory: size must be a number"),
    Case("name-newline", 8, audit("{tok}", *SMALL, "--name", "org/a\nb"), 2, r"--name: must be a Hub repo id"),
    Case("name-dotdot", 8, audit("{tok}", *SMALL, "--name", ".."), 2, r"--name: must be a Hub repo id"),
    # a folder name that is no valid file name (232 bytes, a newline, a leading '.') still gives a valid slug
    # (issue 27's rule cuts each part to 60 characters and replaces unsafe ones): the audit is written there
    Case("folder-name-232-bytes", 7, audit("{n232}", *SMALL), 0, None, writes=True,
         expect=("audits/{slug_n232}/audit.json", "model_cards/{slug_n232}/README.md")),
    Case("folder-name-newline", 7, audit("{newline}", *SMALL), 0, None, writes=True,
         expect=("audits/{slug_newline}/audit.json",)),
    Case("folder-name-hidden", 7, audit("{hidden}", *SMALL), 0, None, writes=True,
         expect=("audits/{slug_hidden}/audit.json",)),
    # a slug that cannot be a file name is refused before the model is loaded: a hub GGUF file of long names
    # at a long revision (the fixture's HF cache), with the suffixes counted ...
    Case("output-name-hub-gguf-235-bytes", 8, audit("{long_gguf}", "--revision", "{long_rev}", *SMALL), 2,
         r"output name '" + "o" * 35 + "__" + "r" * 20 + r"\.\.\.' is 235 bytes; the names made from it reach 259 "
         r"bytes, more than the 255 a file name may have \(at most 231 for the name itself\); choose the name with "
         r"--name", setup="hub_cache"),
    Case("output-name-init-suffix", 8, audit("{long_gguf}", "--revision", "{long_rev}", "--init", *SMALL), 2,
         r"is 241 bytes", setup="hub_cache"),
    # ... and an audit file's slug, at the 231-byte boundary, or hidden
    Case("from-audit-slug-232-bytes", 8, audit("--from-audit", "{slug232_audit}"), 2,
         r"output name '" + "n" * 57 + r"\.\.\.' is 232 bytes; the names made from it reach 256 bytes, more than "
         r"the 255 a file name may have \(at most 231 for the name itself\); choose the name with --name"),
    Case("from-audit-slug-231-bytes", 7, audit("--from-audit", "{slug231_audit}"), 0, None, writes=True,
         expect=("audits/{slug231}/audit.json", "model_cards/{slug231}/README.md")),
    Case("from-audit-slug-hidden", 8, audit("--from-audit", "{slug_hidden_audit}"), 2,
         r"output name '\.[^']*__tok-[0-9a-f]{6}[^']*' is empty or starts with '\.'"),
    Case("corrupt-tokenizer", 8, audit("{bad_tok}", *SMALL), 2,
         r"tokenizer of .*bad_tok \(tokenizer\.json, tokenizer_config\.json\) cannot be loaded"),
    Case("empty-tokenizer-vocab", 8, audit("{empty_tok}", *SMALL), 2,
         r"tokenizer of .*empty_tok \(tokenizer\.json.*\) loads with no usable vocabulary"),
    Case("no-tokenizer-says-random-ids", 8, audit("{notok}", *SMALL), 0, None, writes=True,
         expect=("audits/{slug_notok}/audit.json",)),
    # 9. one line on stderr, whatever the libraries say
    Case("usage-error-one-line", 9, audit("{tok}", "--tokens", "abc"), 2, r"argument --tokens: invalid int"),
    Case("choices-error-one-line", 9, audit("{tok}", "--device-map", "nope"), 2, r"argument --device-map"),
    Case("loading-report-then-error", 9, audit("{extra_keys}", "--tokens", "512", "--seq-len", "512", "-q"), 2,
         r"--seq-len 512 exceeds the model's 256 positions"),
    Case("tokenizer-warning-then-error", 9, audit("{short_max_len}", "--text", "{smalltext}", "--tokens", "2048",
                                                   "--seq-len", "64", "-q"), 2, r"gives only \d+ tokens"),
    Case("two-line-config-message", 9, audit("--config", "{bad_heads}", *SMALL), 2, r"^hf-rksp: error: invalid config"),
    Case("warning-then-error-not-quiet", 9, audit("{notok}", "--tokens", "512", "--seq-len", "512"), 2,
         r"--seq-len 512 exceeds the model's 256 positions"),
    # 10. the token never leaves the machine by accident, outputs never leave the output folder (issue 28)
    Case("push-repo-id-token", 10, ("push", SLUG, "--repo-id", "{token}/audits", "--dry-run", "--out-dir", "{out}"),
         2, TOKEN_LINE.format(flag="--repo-id")),
    Case("push-revision-token", 10, ("push", SLUG, "--repo-id", "a/b", "--revision", "{token}", "--dry-run",
                                     "--out-dir", "{out}"), 2, TOKEN_LINE.format(flag="--revision")),
    Case("push-model-pr-repo-token", 10, ("push", SLUG, "--to-model", "--repo-id", "org/x{token}", "--dry-run",
                                          "--out-dir", "{out}"), 2, TOKEN_LINE.format(flag="--repo-id")),
    Case("push-to-token-before-audit", 10, audit("{tok}", *SMALL, "--push-to", "{token}/x"), 2,
         TOKEN_LINE.format(flag="--push-to"), max_s=5.0, setup="no_loading"),
    Case("push-to-bad-repo-id-before-audit", 10, audit("{tok}", *SMALL, "--push-to", "a/b c"), 2,
         r"--push-to: must be a Hub repo id", max_s=5.0, setup="no_loading"),
    Case("push-to-no-user-before-audit", 10, audit("{tok}", *SMALL, "--push-to", "justname"), 2,
         r"--push-to: must look like USER/NAME", max_s=5.0, setup="no_loading"),
    Case("name-token", 10, audit("{tok}", *SMALL, "--name", "org/{token}"), 2, TOKEN_LINE.format(flag="--name"),
         setup="no_loading"),
    Case("name-is-active-token", 10, audit("{tok}", *SMALL, "--name", "org/{active}"), 2,
         TOKEN_LINE.format(flag="--name"), setup="legacy_token"),
    Case("source-path-token", 10, audit("{tok_token}", *SMALL), 2, TOKEN_LINE.format(flag="source"),
         setup="no_loading"),
    Case("text-path-token", 10, audit("{tok}", *SMALL, "--text", "{text_token}"), 2, TOKEN_LINE.format(flag="--text"),
         setup="no_loading"),
    Case("out-dir-token", 10, ("audit", "{tok}", *SMALL, "--out-dir", "{out}/{token}"), 2,
         TOKEN_LINE.format(flag="--out-dir"), setup="no_loading"),
    Case("push-audit-source-id-token", 10, ("push", SLUG, "--repo-id", "a/b", "--dry-run", "--out-dir", "{out}"), 2,
         r"audits/" + SLUG + r"/audit\.json holds a Hugging Face access token.*nothing was uploaded",
         setup="token_in_audit"),
    Case("push-card-token", 10, ("push", SLUG, "--repo-id", "a/b", "--dry-run", "--out-dir", "{out}"), 2,
         r"model_cards/" + SLUG + r"/README\.md holds a Hugging Face access token", setup="token_in_card"),
    Case("push-to-model-source-id-token", 10, ("push", SLUG, "--to-model", "--dry-run", "--out-dir", "{out}"), 2,
         r"audit\.json holds a Hugging Face access token", setup="token_in_audit"),
    Case("from-audit-source-id-token", 10, audit("--from-audit", "{token_audit}"), 2,
         r"audits/" + SLUG + r"/audit\.json would hold a Hugging Face access token.*nothing was written"),
    Case("slug-folder-symlink", 10, audit("{tok}", *SMALL), 2, SYMLINK_LINE.format(path="audits/" + SLUG),
         setup="link_slug"),
    Case("card-folder-symlink", 10, audit("--from-audit", "{good}"), 2, SYMLINK_LINE.format(path="model_cards/" + SLUG),
         setup="link_card"),
    Case("audits-symlink", 10, audit("{tok}", *SMALL), 2, SYMLINK_LINE.format(path="audits"), setup="link_audits"),
    Case("file-in-slug-symlink", 10, audit("--from-audit", "{good}"), 2,
         SYMLINK_LINE.format(path="audits/" + SLUG + "/spectrum.png"), setup="link_file"),
    Case("push-file-symlink", 10, ("push", SLUG, "--repo-id", "a/b", "--dry-run", "--out-dir", "{out}"), 2,
         r"audits/" + SLUG + r"/spectrum\.png is a symbolic link: push sends only real files", setup="link_file"),
    Case("partial-symlink", 10, audit("{tok}", *STREAM), 2, SYMLINK_LINE.format(path="audits/.partial"),
         setup="link_partial"),
    Case("partial-entry-symlink", 10, audit("{tok}", *STREAM), 2,
         SYMLINK_LINE.format(path="audits/.partial/" + SLUG + "-0123456789abcdef"), setup="link_partial_entry"),
    Case("journal-symlink", 10, ("push", SLUG, "--repo-id", "a/b", "--dry-run", "--out-dir", "{out}"), 2,
         SYMLINK_LINE.format(path=r"audits/\.publish-" + SLUG + r"\.json"), setup="link_journal"),
    Case("journal-naming-outside", 10, audit("{tok}", *SMALL), 2,
         r"publish-" + SLUG + r"\.json names paths outside --out-dir's audits/ and model_cards/", setup="journal_outside"),
    # 11. nothing silently replaced (issue 27): another audit in the slug's folder is refused without --overwrite
    Case("other-inputs-refused", 11, audit("--from-audit", "{other_inputs}"), 2,
         r"audits/" + SLUG + r" holds another audit \(different calibration inputs\); pass --overwrite to replace "
         r"it, or --out-dir elsewhere"),
    Case("other-inputs-overwrite", 11, audit("--from-audit", "{other_inputs}", "--overwrite"), 0, None, writes=True,
         expect=(f"audits/{SLUG}/audit.json",)),
    Case("other-method-refused", 11, audit("--from-audit", "{other_method}"), 2,
         r"audits/" + SLUG + r" holds another audit \(different .*method"),
    Case("unreadable-audit-in-folder-refused", 11, audit("{tok}", *SMALL), 2,
         r"audits/" + SLUG + r" holds a file that is not a readable audit; pass --overwrite", setup="garbage_audit"),
    Case("unreadable-audit-overwrite", 11, audit("{tok}", *SMALL, "--overwrite"), 0, None, writes=True,
         setup="garbage_audit", expect=(f"audits/{SLUG}/audit.json",)),
    Case("same-audit-refreshes", 11, audit("--from-audit", "{good}"), 0, None, writes=True,
         expect=(f"audits/{SLUG}/audit.json",)),
    Case("no-write-replaces-nothing", 11, audit("{tok}", *SMALL, "--seed", "4", "--no-write"), 0, None),
    Case("format-json-no-write", 11, audit("{tok}", *SMALL, "--no-write", "--format", "json"), 0, None),
    # 12. output folders that cannot be written, and paths of every alphabet and length
    Case("read-only-out-dir", 12, audit("{tok}", *SMALL), 2,
         r"--out-dir .*: cannot write in .*out: Read-only file system", setup="read_only_out", max_s=5.0),
    Case("read-only-while-publishing", 12, audit("{tok}", *SMALL, "--seed", "3"), 2,
         r"could not write the audit under .*out: Read-only file system .*; earlier outputs are unchanged$",
         setup="staging_erofs"),
    Case("read-only-from-audit", 12, audit("--from-audit", "{good}"), 2,
         r"could not write the audit under .*out: Read-only file system .*; earlier outputs are unchanged$",
         setup="staging_erofs"),
    Case("unicode-checkpoint-folder", 12, audit("{uni}", *SMALL), 0, None, writes=True,
         expect=("audits/{slug_uni}/audit.json", "model_cards/{slug_uni}/README.md")),
    Case("unicode-text-file", 12, audit("{tok}", *SMALL, "--text", "{uni_text}"), 0, None, writes=True,
         expect=("audits/{slug_uni_text}/audit.json",)),
    Case("unicode-out-dir", 12, ("audit", "--from-audit", "{good}", "--out-dir", "{out}/données/模型"), 0, None,
         writes=True, expect=(f"données/模型/audits/{SLUG}/audit.json",)),
    Case("out-dir-beyond-path-max", 12, ("audit", "{tok}", *SMALL, "--out-dir", "{out}/" + "/".join(["d" * 200] * 22)),
         2, r"^.{0,400}\d{4} (characters\)|bytes long; a path may have at most 4095): File name too long$",
         prefill=False, max_s=5.0, setup="no_loading"),
    Case("out-dir-name-300-bytes", 12, ("audit", "{tok}", *SMALL, "--out-dir", "{out}/" + "x" * 300), 2,
         r"--out-dir .*: the folder name x+\.\.\.x+ is 300 bytes, more than the 255 a file name may have: File name "
         r"too long$", prefill=False, max_s=5.0, setup="no_loading"),
    Case("text-path-5000-bytes", 12, audit("{tok}", *SMALL, "--text", "/" + "t" * 5000 + ".txt"), 2,
         r"^hf-rksp: error: --text /t{79}\.\.\.t{76}\.txt \(5005 characters\): File name too long$"),
    Case("source-path-5000-bytes", 12, audit("/" + "m" * 5000, *SMALL), 2,
         r"^hf-rksp: error: source /m{79}\.\.\.m{80} \(5001 characters\): File name too long$"),
    Case("config-path-5000-bytes", 12, audit("--config", "/" + "c" * 5000 + ".json", *SMALL), 2,
         r"^hf-rksp: error: --config /c{79}\.\.\.c{75}\.json \(5006 characters\): File name too long$"),
]


# ----------------------------------------------------------------------------- fixtures


def save_checkpoint(path: Path, seed: int = 0, shard: str = "150KB", tokenizer=None, **overrides) -> Path:
    """A tiny sharded GPT-2 checkpoint (safetensors shards + index), optionally with a tokenizer."""
    from transformers import AutoModel

    from hf_rksp.models.blocks import find_blocks
    from hf_rksp.models.init import seeded_init

    model = AutoModel.from_config(tiny_config("gpt2", **overrides))
    seeded_init(model, find_blocks(model)[1], seed)
    model.save_pretrained(path, max_shard_size=shard)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def _shard_of(ckpt: Path, key: str) -> Path:
    return ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][key]


def _rewrite(ckpt: Path, key: str, fn) -> None:
    from safetensors.torch import load_file, save_file

    f = _shard_of(ckpt, key)
    sd = load_file(str(f))
    sd[key] = fn(sd[key])
    save_file(sd, str(f), metadata={"format": "pt"})


def _variant(root: Path, good: Path, name: str, damage) -> Path:
    d = root / name
    shutil.copytree(good, d)
    damage(d)
    return d


def _audit_variant(root: Path, good: Path, name: str, edit) -> Path:
    """A copy of the good audit folder whose audit.json text is ``edit(text)`` (bytes or str)."""
    d = root / "audits" / name
    shutil.copytree(good, d)
    new = edit((good / "audit.json").read_text())
    (d / "audit.json").write_bytes(new if isinstance(new, bytes) else new.encode())
    return d


def _with(data: dict, path: str, value) -> str:
    """The audit JSON with the value at ``a.b.c`` replaced (keys or list indices), as text."""
    data = json.loads(json.dumps(data))
    *head, last = path.split(".")
    node = data
    for k in head:
        node = node[int(k)] if isinstance(node, list) else node[k]
    if value is KeyError:  # the key absent (already absent is fine: e.g. no risk reason when risk is filled)
        node.pop(last, None)
    else:
        node[last] = value
    return json.dumps(data, indent=2)


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> dict[str, Path]:
    """Every path the rows name: checkpoints good and damaged, configs, texts, audit files good and hostile."""
    from hf_rksp import audit as run_audit

    root = tmp_path_factory.mktemp("bad_input")
    tok = tiny_tokenizer()
    good = save_checkpoint(root / "tok", tokenizer=tok)
    assert len(list(good.glob("*.safetensors"))) >= 3
    p = {"root": root, "tok": good}
    first = _shard_of(good, "h.0.attn.c_attn.weight")

    def corrupt_header(d):
        f = d / first.name
        data = bytearray(f.read_bytes())
        data[8:40] = b"\x00not json at all\xff" * 2
        f.write_bytes(bytes(data))

    p["corrupt_header"] = _variant(root, good, "corrupt_header", corrupt_header)
    p["bad_header_len"] = _variant(root, good, "bad_header_len", lambda d: (d / first.name).write_bytes(
        (2**62).to_bytes(8, "little") + (d / first.name).read_bytes()[8:]))
    p["corrupt_index"] = _variant(root, good, "corrupt_index",
                                  lambda d: (d / "model.safetensors.index.json").write_text("{not json"))
    p["no_weight_map"] = _variant(root, good, "no_weight_map",
                                  lambda d: (d / "model.safetensors.index.json").write_text('{"metadata": {}}'))
    p["missing_shard"] = _variant(root, good, "missing_shard", lambda d: (d / first.name).unlink())
    p["shape_mismatch"] = _variant(root, good, "shape_mismatch", lambda d: _rewrite(
        d, "h.1.mlp.c_fc.weight", lambda t: torch.zeros(t.shape[0], t.shape[1] // 2)))
    p["nan_ckpt"] = _variant(root, good, "nan_ckpt", lambda d: _rewrite(
        d, "h.1.attn.c_attn.weight", lambda t: torch.full_like(t, float("nan"))))
    p["extra_keys"] = _variant(root, good, "extra_keys", lambda d: _add_tensor(d, "h.0.unexpected.weight"))
    p["notok"] = save_checkpoint(root / "notok")
    p["reweighted"] = _variant(root, good, "reweighted", lambda d: None)  # its block 0 changes in its row
    p["n232"] = _variant(root, good, "n" * 232, lambda d: None)
    p["newline"] = _variant(root, good, "tok\nx", lambda d: None)
    p["hidden"] = _variant(root, good, ".tok", lambda d: None)
    p["bad_tok"] = _variant(root, good, "bad_tok", lambda d: (d / "tokenizer.json").write_text('{"model": 1'))
    p["empty_tok"] = _variant(root, good, "empty_tok", lambda d: (d / "tokenizer.json").write_text(json.dumps(
        {**json.loads((d / "tokenizer.json").read_text()), "model": {"type": "WordLevel", "vocab": {"[UNK]": 0},
                                                                      "unk_token": "[UNK]"}})))

    short = root / "short_max_len"
    shutil.copytree(good, short)
    tok.model_max_length = 16
    tok.save_pretrained(short)
    p["short_max_len"] = short

    configs = root / "configs"
    configs.mkdir()
    huge = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 65536, "intermediate_size": 262144,
            "num_attention_heads": 512, "num_key_value_heads": 512, "vocab_size": 512,
            "max_position_embeddings": 256}
    for name, cfg in {"huge": huge,
                      "vocab0": {**tiny_config("gpt2").to_dict(), "vocab_size": 0},
                      "npos0": {**tiny_config("gpt2").to_dict(), "n_positions": 0},
                      "bad_heads": {**tiny_config("gpt2").to_dict(), "n_embd": 65},
                      "many_layers": {**tiny_config("gpt2").to_dict(), "n_layer": 10**8}}.items():
        p[name] = configs / f"{name}.json"
        p[name].write_text(json.dumps(cfg))
    p["deep_cfg"] = configs / "deep.json"
    p["deep_cfg"].write_text("[" * 200_000 + "]" * 200_000)

    sentence = "The residual stream of a transformer carries the signal from block to block. "
    p["bigtext"] = root / "big.txt"
    with open(p["bigtext"], "w") as f:
        for _ in range(32):
            f.write(sentence * 8192)  # 32 x 640 KB = 20 MB
    p["smalltext"] = root / "small.txt"
    p["smalltext"].write_text(sentence * 8)
    p["afile"] = root / "a-file"
    p["afile"].write_text("not a folder\n")
    p["tok_token"] = root / f"ckpt-{FAKE_TOKEN}"  # a checkpoint whose path holds the token
    p["tok_token"].symlink_to(good, target_is_directory=True)
    p["text_token"] = root / f"notes-{FAKE_TOKEN}.txt"
    p["text_token"].write_text(sentence * 8)

    # the good audit, and hostile versions of its JSON
    out = root / "made"
    p["slug"] = run_audit(str(good), out_dir=str(out), tokens=128, seq_len=64, progress=False).record.slug
    p["slug_text"] = slug_of(str(good), "--text", str(p["bigtext"]), *SMALL)
    p["slug_name"] = slug_of(str(good), *SMALL, "--name", "org/tiny-model")
    p["slug_reweighted"] = slug_of(str(p["reweighted"]), *STREAM)
    p["slug_notok"] = slug_of(str(p["notok"]), *SMALL)
    for k in ("n232", "newline", "hidden"):  # folder names that are no file names give valid slugs
        p[f"slug_{k}"] = slug = slug_of(str(p[k]), *SMALL)
        assert len(slug.encode()) <= 231 and not slug.startswith(".") and "\n" not in slug, slug
    # a hub GGUF file in an HF cache of this test's own: 35 + 60 + 60 characters of names at a 60-character
    # revision, so its slug (hub part, file, revision, and the 8-hex options) is 235 bytes
    p["hub_cache"], p["long_gguf"], p["long_rev"] = root / "hub-cache", f"{'o' * 35}/{'r' * 60}/{'f' * 60}.gguf", "v" * 60
    repo, commit = p["hub_cache"] / f"models--{'o' * 35}--{'r' * 60}", "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / p["long_rev"]).write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / f"{'f' * 60}.gguf").write_bytes(b"GGUF")  # never read: refused before loading
    assert p["slug_name"].startswith("org__tiny-model__")
    p["good_out"] = out
    p["good"] = out / "audits" / p["slug"]
    data = json.loads((p["good"] / "audit.json").read_text())
    g = p["good"]
    p["nan"] = _audit_variant(root, g, "nan", lambda t: _with(data, "blocks.0.spectral_radius", 1.0).replace(
        '"spectral_radius": 1.0', '"spectral_radius": NaN', 1))
    p["inf"] = _audit_variant(root, g, "inf", lambda t: t.replace('"total_s": ', '"total_s": Infinity, "x": ', 1))
    p["big"] = _audit_variant(root, g, "big", lambda t: t.replace('"total_s": ', '"total_s": 1e400, "x": ', 1))
    p["no_timings"] = _audit_variant(root, g, "no_timings", lambda t: _with(data, "timings", {}))
    p["no_reason"] = _audit_variant(root, g, "no_reason", lambda t: _with(data, "risk_unavailable_reason", KeyError))
    p["bad_risk"] = _audit_variant(root, g, "bad_risk", lambda t: _with(data, "risk", {"probability": 0.5}))
    p["deep"] = _audit_variant(root, g, "deep", lambda t: t[:-2] + ', "x": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    p["latin1"] = _audit_variant(root, g, "latin1", lambda t: t.replace('"slug"', '"sl\xe9g"').encode("latin-1",
                                                                                                      "replace"))
    p["huge_list"] = _audit_variant(root, g, "huge_list", lambda t: _with(data, "blocks", [1] * 2_000_000))
    for name, size in (("sparse", 390 * 2**20), ("at_cap", 64 * 2**20)):  # holes: no disk, no time to write
        p[name] = root / "audits" / name
        p[name].mkdir()
        with open(p[name] / "audit.json", "wb") as f:
            f.truncate(size)
    p["no_eigs"] = _audit_variant(root, g, "no_eigs", lambda t: _with(data, "blocks.0.eigenvalues", []))
    p["huge_eta"] = _audit_variant(root, g, "huge_eta", lambda t: _with(data, "blocks.0.nonlinearity_ratio", 1e308))
    p["slug_dotdot"] = _audit_variant(root, g, "slug_dotdot", lambda t: _with(data, "slug", ".."))
    p["token_audit"] = _audit_variant(root, g, "token_audit", lambda t: _with(data, "source.id", f"org/{FAKE_TOKEN}"))
    tail = p["slug"][p["slug"].index("__"):]  # the good slug with its folder part replaced: still follows
    p["slug231"] = "n" * (231 - len(tail)) + tail
    for name, slug in (("slug232", "n" * (232 - len(tail)) + tail), ("slug231", p["slug231"]),
                       ("slug_hidden", "." + p["slug"])):
        p[f"{name}_audit"] = _audit_variant(root, g, name, lambda t, s=slug: _with(data, "slug", s))
    agg = "summary.features.resdmd_residual_max.mean"
    p["low"] = _audit_variant(root, g, "low", lambda t: _with(data, agg, -1.7e308))
    p["high"] = _audit_variant(root, g, "high", lambda t: _with(data, agg, 1.7e308))
    # issue 27: the same slug, another audit (other calibration inputs; another method parameter)
    p["other_inputs"] = _audit_variant(root, g, "other_inputs", lambda t: _with(data, "inputs.sha256", "0" * 64))
    p["other_method"] = _audit_variant(root, g, "other_method", lambda t: _with(data, "method.resdmd_tau", 0.2))
    p["uni"] = _variant(root, good, "模型-ü☃ é", lambda d: None)
    p["slug_uni"] = slug_of(str(p["uni"]), *SMALL)
    p["uni_text"] = root / "текст ☃.txt"
    p["uni_text"].write_text("Ο κύριος ρόλος του residual stream — 残差ストリーム — ist es, Signale weiterzugeben. " * 64)
    p["slug_uni_text"] = slug_of(str(good), *SMALL, "--text", str(p["uni_text"]))
    return p


def _add_tensor(ckpt: Path, key: str) -> None:
    """An extra tensor the model does not have (transformers reports it while loading)."""
    from safetensors.torch import load_file, save_file

    f = _shard_of(ckpt, "h.0.attn.c_attn.weight")
    sd = load_file(str(f))
    sd[key] = torch.zeros(2)
    save_file(sd, str(f), metadata={"format": "pt"})
    index = ckpt / "model.safetensors.index.json"
    idx = json.loads(index.read_text())
    idx["weight_map"][key] = f.name
    index.write_text(json.dumps(idx))


# ----------------------------------------------------------------------------- faults (setups)


def _low_memory(fx, out, monkeypatch):
    from hf_rksp.models import memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 4 * 2**30)


def _card_rename_fails(fx, out, monkeypatch):
    real = os.rename

    def flaky(src, dst):
        if ".stage." in Path(src).name and Path(dst).parent.name == "model_cards":
            raise OSError(errno.EACCES, "Permission denied", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "rename", flaky)


def _staging_enospc(fx, out, monkeypatch):
    from hf_rksp.publish import local as publish

    real, calls = publish._write_files, []

    def full(folder, files):
        calls.append(folder)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder))
        return real(folder, files)

    monkeypatch.setattr(publish, "_write_files", full)


def _progress_enospc(fx, out, monkeypatch):
    from hf_rksp.capture import streaming

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(streaming.torch, "save", full)


def _interrupt(fx, out, monkeypatch):
    interrupt_block(monkeypatch, 2)


def _weights_changed_after_interrupt(fx, out, monkeypatch):
    """Ctrl-C at block 2 of a streamed audit, then block 0's shard rewritten with other values."""
    with monkeypatch.context() as m:
        _interrupt(fx, out, m)
        assert main(["audit", str(fx["reweighted"]), *STREAM, "--out-dir", str(out)]) == 130
    assert list((out / "audits" / ".partial").glob("*/progress.json"))
    _rewrite(fx["reweighted"], "h.0.attn.c_attn.weight", lambda t: torch.flip(t, dims=[0]).contiguous())


def _tampered_progress(fx, out, monkeypatch):
    with monkeypatch.context() as m:
        _interrupt(fx, out, m)
        assert main(["audit", str(fx["tok"]), *STREAM, "--out-dir", str(out)]) == 130
    (progress,) = (out / "audits" / ".partial").glob("*/progress.json")
    state = json.loads(progress.read_text())
    state["results"] = [{"index": "x"}] * state["next_block"]
    progress.write_text(json.dumps(state))


def _killed_publish(fx, out, monkeypatch):
    """A publish of a newer audit killed between its renames (the card not switched yet)."""
    from hf_rksp.record.records import read_audit

    new = _newer(read_audit(out / "audits" / fx["slug"]))
    assert kill_at_rename(new, out, 4) == -signal.SIGKILL
    assert list((out / "audits").glob(".publish-*.json")), "the killed publish left no journal"


def _count_offload_dirs(fx, out, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(out.parent / "tmp"))
    (out.parent / "tmp").mkdir(exist_ok=True)
    monkeypatch.setattr(tempfile, "tempdir", None)


def _no_loading(fx, out, monkeypatch):
    """The row must fail before any model is looked up or loaded."""
    from hf_rksp.pipeline import run

    def never(*a, **k):
        raise AssertionError("the model was looked up: the check came too late")

    for name in ("resolve_source", "load_model", "load_for_streaming"):
        monkeypatch.setattr(run, name, never)


def _hub_cache(fx, out, monkeypatch):
    """The fixture's HF cache (a hub GGUF file at a revision) is the cache; no model may be loaded."""
    import huggingface_hub.constants

    from hf_rksp.pipeline import run

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(fx["hub_cache"]))

    def never(*a, **k):
        raise AssertionError("the model was loaded: the check came too late")

    for name in ("load_model", "load_for_streaming", "plan_for"):
        monkeypatch.setattr(run, name, never)


def _legacy_token(fx, out, monkeypatch):
    """An active token that is not token-shaped (an old-style one): only equality can find it."""
    monkeypatch.setenv("HF_TOKEN", "api_" + "".join(random.SystemRandom().choices(string.ascii_letters, k=30)))


def _token_in_audit(fx, out, monkeypatch):
    """An earlier audit whose source id holds the token (typed by mistake), as a hub id."""
    f = out / "audits" / fx["slug"] / "audit.json"
    data = json.loads(f.read_text())
    data["source"].update(id=f"org/{FAKE_TOKEN}", kind="hub")
    f.write_text(json.dumps(data, indent=2))


def _token_in_card(fx, out, monkeypatch):
    with open(out / "model_cards" / fx["slug"] / "README.md", "a") as f:
        f.write(f"\nnote to self: {FAKE_TOKEN}\n")


def _garbage_audit(fx, out, monkeypatch):
    """The slug's folder holds an audit.json that is not an audit (a user's file, a truncated write)."""
    (out / "audits" / fx["slug"] / "audit.json").write_text("{not an audit")


def _read_only_out(fx, out, monkeypatch):
    """The output folder is on a read-only file system (EROFS, which root gets too: chmod would not do)."""
    real = tempfile.TemporaryFile

    def ro(*a, dir=None, **k):
        if dir is not None and Path(dir).resolve() == out.resolve():
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "TemporaryFile", ro)


def _staging_erofs(fx, out, monkeypatch):
    """The file system turns read-only (remounted after an error) between the check and the publish."""
    from hf_rksp.publish import local as publish

    def ro(folder, files):
        raise OSError(errno.EROFS, "Read-only file system", str(folder))

    monkeypatch.setattr(publish, "_write_files", ro)


def _outside(out: Path) -> Path:
    """The folder outside the output folder that the symlink rows point into (made by the test)."""
    return out.parent / "outside"


def _link(path: Path, target: Path) -> None:
    """``path`` becomes a symlink to ``target``; what ``path`` held moves to ``target`` (when it is absent)."""
    if path.exists() and not target.exists():
        shutil.move(path, target)
    elif path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target, target_is_directory=target.is_dir())


def _link_out_dir(fx, out, monkeypatch):
    """``--out-dir`` itself is a link (to the output folder): the folder the user named, written through."""
    (out.parent / "outlink").symlink_to(out, target_is_directory=True)


def _link_slug(fx, out, monkeypatch):
    _link(out / "audits" / fx["slug"], _outside(out) / "someone-elses-audit")


def _link_card(fx, out, monkeypatch):
    _link(out / "model_cards" / fx["slug"], _outside(out) / "someone-elses-card")


def _link_audits(fx, out, monkeypatch):
    _link(out / "audits", _outside(out) / "audits")


def _link_file(fx, out, monkeypatch):
    _link(out / "audits" / fx["slug"] / "spectrum.png", _outside(out) / "notes.txt")


def _link_partial(fx, out, monkeypatch):
    (_outside(out) / "partial").mkdir()
    _link(out / "audits" / ".partial", _outside(out) / "partial")


def _link_partial_entry(fx, out, monkeypatch):
    (_outside(out) / "partial").mkdir()
    _link(out / "audits" / ".partial" / f"{fx['slug']}-0123456789abcdef", _outside(out) / "partial")


def _link_journal(fx, out, monkeypatch):
    (_outside(out) / "journal.json").write_text('{"steps": []}')
    _link(out / "audits" / f".publish-{fx['slug']}.json", _outside(out) / "journal.json")


def _journal_outside(fx, out, monkeypatch):
    """A journal whose renames name a folder outside the output folder."""
    slug = fx["slug"]
    steps = [{"staged": "../outside/notes", "target": f"audits/{slug}", "backup": f"audits/.{slug}.old.1.ab",
              "had_target": True}]
    (_outside(out) / "notes").mkdir()
    (out / "audits" / f".publish-{slug}.json").write_text(json.dumps({"steps": steps}))


SETUPS = {"low_memory": _low_memory, "card_rename_fails": _card_rename_fails, "staging_enospc": _staging_enospc,
          "progress_enospc": _progress_enospc, "interrupt": _interrupt, "tampered_progress": _tampered_progress,
          "weights_changed_after_interrupt": _weights_changed_after_interrupt,
          "killed_publish": _killed_publish, "count_offload_dirs": _count_offload_dirs, "no_loading": _no_loading, "hub_cache": _hub_cache,
          "legacy_token": _legacy_token, "token_in_audit": _token_in_audit, "token_in_card": _token_in_card,
          "link_slug": _link_slug, "link_card": _link_card, "link_audits": _link_audits, "link_file": _link_file,
          "link_partial": _link_partial, "link_partial_entry": _link_partial_entry, "link_journal": _link_journal,
          "journal_outside": _journal_outside, "link_out_dir": _link_out_dir, "garbage_audit": _garbage_audit,
          "read_only_out": _read_only_out, "staging_erofs": _staging_erofs}


# ----------------------------------------------------------------------------- helpers


def tree_hash(root: Path) -> str:
    """sha256 over every path under ``root`` (hidden ones too), its kind, and every file's bytes."""
    h = hashlib.sha256()
    if not root.exists():
        return "absent"
    for dirpath, dirs, names in sorted(os.walk(root)):
        dirs.sort()
        for n in sorted(dirs):
            h.update(b"d " + str(Path(dirpath, n).relative_to(root)).encode() + b"\0")
        for n in sorted(names):
            f = Path(dirpath, n)
            h.update(b"f " + str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of every regular file under ``root`` (hidden ones too; links are not followed)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            f = Path(dirpath, n)
            if not f.is_symlink():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def leaks(data: bytes | str, tokens: tuple[str, ...]) -> bool:
    """Whether ``data`` holds one of ``tokens`` or a token-shaped string."""
    data = data.encode() if isinstance(data, str) else data
    return bool(TOKEN_SHAPED.search(data)) or any(t.encode() in data for t in tokens)


def _slug(out: Path) -> str:
    """The slug of the one audit under ``out``."""
    (d,) = [p for p in (out / "audits").iterdir() if not p.name.startswith(".")]
    return d.name


def _newer(record):
    from dataclasses import replace

    return replace(record, created="2099-01-01T00:00:00+00:00", command=record.command + " --seed 9")


def kill_at_rename(record, out: Path, n: int) -> int:
    """Publish ``record`` under ``out`` in a forked child that SIGKILLs itself at its ``n``-th rename.

    Returns the child's wait status as a signal (-9) or its exit code (the number of renames when ``n``
    was never reached).
    """
    pid = os.fork()
    if pid == 0:  # the child: count os.rename/os.replace calls, die at the n-th, before it runs
        try:
            from hf_rksp.pipeline.run import write_outputs

            count = [0]

            def dying(real):
                def call(*a, **k):
                    count[0] += 1
                    if count[0] == n:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*a, **k)
                return call

            os.rename, os.replace = dying(os.rename), dying(os.replace)
            write_outputs(record, out)
            os._exit(count[0])
        except BaseException:
            os._exit(255)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _run(argv: list[str], capfd) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    cap = capfd.readouterr()
    return rc, cap.out, cap.err


# ----------------------------------------------------------------------------- the table


def test_every_class_has_three_cases():
    per_class = {c: sum(1 for case in CASES if case.cls == c) for c in range(1, 13)}
    assert all(n >= 3 for n in per_class.values()), per_class
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.cls}-{c.id}" for c in CASES])
def test_bad_input(case: Case, fx, tmp_path, monkeypatch, capfd):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)  # the user's token is set (a stored login is not looked at)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-login"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
    debug_log = tmp_path / "debug.log"
    monkeypatch.setenv("HF_RKSP_LOG", str(debug_log))
    out, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    (outside / "notes.txt").write_text("someone's notes, outside the output folder\n")
    if case.prefill:
        shutil.copytree(fx["good_out"], out)
    monkeypatch.chdir(fx[case.cwd] if case.cwd else tmp_path)
    if case.setup:
        SETUPS[case.setup](fx, out, monkeypatch)
    capfd.readouterr()
    active = os.environ["HF_TOKEN"]
    paths = {k: str(v) for k, v in fx.items()} | {"out": str(out), "token": FAKE_TOKEN, "active": active,
                                                   "outlink": str(tmp_path / "outlink")}
    argv = [a.format(**paths) for a in case.argv]
    before, tmp_before = tree_hash(out), sorted(os.listdir(tempfile.gettempdir()))
    outside_before, files_before = tree_hash(outside), file_digests(out)

    t0 = time.perf_counter()
    rc, stdout, err = _run(argv, capfd)
    elapsed = time.perf_counter() - t0

    tokens = (FAKE_TOKEN, active)
    assert not leaks(stdout, tokens), "a token on stdout"
    assert not leaks(err, tokens), "a token on stderr"
    assert not (debug_log.exists() and leaks(debug_log.read_bytes(), tokens)), "a token in the debug log"
    written = [f for f, d in file_digests(out).items() if files_before.get(f) != d]
    assert not [f for f in written if leaks(Path(f).read_bytes(), tokens)], "a token in a file written"
    assert tree_hash(outside) == outside_before, "a folder outside the output folder changed"
    assert not [f for f in file_digests(outside) if leaks(Path(f).read_bytes(), tokens)]
    if case.max_s is not None:
        assert elapsed < case.max_s, f"took {elapsed:.1f} s"

    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if case.line is None:
        assert rc == case.code, f"expected exit {case.code}, got {rc}:\n{err}"
        assert not any("error" in ln for ln in lines), err
    else:
        assert rc == case.code, f"expected exit {case.code}, got {rc}:\n{err}"
        assert len(lines) == 1, f"stderr should be exactly one line, got {len(lines)}:\n{err[:3000]}"
        assert lines[0].startswith("hf-rksp: "), lines[0]
        pattern = case.line.replace(SLUG, re.escape(fx["slug"]))  # the good audit's slug, where a row names it
        assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"
    if not case.writes:
        assert tree_hash(out) == before, "the output folder changed"
    for rel in case.expect:
        assert (out / rel.format(**paths)).is_file(), f"{rel} missing under the output folder"
    if case.setup == "count_offload_dirs":
        assert sorted(os.listdir(tempfile.gettempdir())) == tmp_before, "a temporary folder was left behind"
    if case.id == "killed-publish-completed":
        _assert_pair(out, "new")
    if case.id == "interrupted-stream-keeps-progress":
        assert list((out / "audits" / ".partial").glob("*/progress.json"))
    if case.id == "progress-of-other-weights":  # started over, said why, and equals a fresh audit
        from hf_rksp import audit as run_audit

        got = json.loads((out / "audits" / fx["slug_reweighted"] / "audit.json").read_text())
        from hf_rksp.utils.threads import default_threads

        # the CLI's thread count (its default: default_threads()), so that float reductions run in the same order
        fresh = run_audit(str(fx["reweighted"]), out_dir=None, stream=True, tokens=128, seq_len=64, progress=False,
                          threads=default_threads())
        assert "resumed_at_block" not in got["timings"] and got["blocks"] == fresh.data["blocks"]
        said = [ln for ln in lines if "other weights" in ln]
        assert len(said) == 1 and re.search(r"warning: .*\(model-0000\d-of-0000\d\.safetensors changed: its "
                                            r"modification time differs\): starting over", said[0]), err
    if case.id == "no-tokenizer-says-random-ids":  # the one fallback to random ids: said on stderr and recorded
        said = [ln for ln in lines if ln.startswith("hf-rksp: ")]  # -q hides progress bars, not this
        assert len(said) == 1 and re.search(r"warning: .*notok has no tokenizer .*random token ids", said[0]), err
        inputs = json.loads((out / "audits" / fx["slug_notok"] / "audit.json").read_text())["inputs"]
        assert inputs["origin"] == "random-token-ids" and inputs["reason"] == "the model has no tokenizer"
        card = (out / "model_cards" / fx["slug_notok"] / "README.md").read_text()
        assert "random-token-ids" in card and "**Not text:** the model has no tokenizer, so hf-rksp calibrated" in card
    if case.id == "compare-json-overflow":
        assert json.loads(stdout)["summary"]["resdmd_residual_max_mean"]["delta"] is None
    if case.writes and rc == 0:
        assert not (out / "audits" / ".partial").exists(), "a completed audit left .partial/"


def _assert_pair(out: Path, which: str) -> None:
    """audit.json and the card of the slug come from the same run: the old one, or the newer (2099) one."""
    slug = _slug(out)
    audit = json.loads((out / "audits" / slug / "audit.json").read_text())
    card = (out / "model_cards" / slug / "README.md").read_text()
    is_new = audit["created"].startswith("2099")
    assert ("--seed 9" in card) == is_new, "audit.json and the card come from different runs"
    if which != "either":
        assert is_new == (which == "new")
    hidden = [p.name for parent in ("audits", "model_cards") for p in (out / parent).iterdir()
              if p.name.startswith(".") and p.name != ".partial"]
    assert hidden == [], f"left behind: {hidden}"


# ----------------------------------------------------------------------------- crashes


def test_kill_at_every_rename_leaves_the_old_or_the_new_pair(fx, tmp_path):
    """SIGKILL before each rename of a publish in turn; after the next run's recovery the slug's audit and
    card are both the old ones or both the new ones, and nothing hidden is left."""
    from hf_rksp.publish.local import recover
    from hf_rksp.record.records import read_audit

    new = _newer(read_audit(fx["good"]))
    probe = tmp_path / "probe"
    shutil.copytree(fx["good_out"], probe)
    n_renames = kill_at_rename(new, probe, 10**6)
    assert 4 <= n_renames < 255, n_renames  # journal, 2 x (target -> backup, staged -> target)
    seen = set()
    for n in range(1, n_renames + 1):
        out = tmp_path / f"kill{n}"
        shutil.copytree(fx["good_out"], out)
        assert kill_at_rename(new, out, n) == -signal.SIGKILL
        recover(out)
        _assert_pair(out, "either")
        seen.add(json.loads((out / "audits" / fx["slug"] / "audit.json").read_text())["created"][:4])
    assert seen == {"2099", read_audit(fx["good"]).created[:4]}  # killed before and after the point of no return


#: the system calls a publish makes, each a step Ctrl-C can land before
PUBLISH_STEPS = ("open", "mkdir", "chmod", "fsync", "rename", "replace", "unlink", "rmdir")


def _interrupt_at(monkeypatch, n: int) -> list[int]:
    """Ctrl-C before the ``n``-th call of any of PUBLISH_STEPS (then they run as usual); returns the count."""
    count = [0]

    def wrapped(real):
        def call(*a, **k):
            count[0] += 1
            if count[0] == n:
                raise KeyboardInterrupt
            return real(*a, **k)
        return call

    for name in PUBLISH_STEPS:
        monkeypatch.setattr(os, name, wrapped(getattr(os, name)))
    return count


@pytest.mark.parametrize("earlier", [True, False], ids=["over-an-earlier-audit", "into-a-fresh-folder"])
def test_ctrl_c_at_every_publish_step_says_the_folder_state(fx, tmp_path, monkeypatch, capfd, earlier):
    """Ctrl-C before each system call of `audit --from-audit NEWER` in turn (recovery, staging, journal,
    renames, clean-up): the one stderr line says exactly which audit the slug's folders hold, nothing hidden
    is left, and the next command's recovery changes nothing (issue 29: it said "nothing was written" after
    the new audit had replaced the earlier one)."""
    from hf_rksp.publish.local import recover
    from hf_rksp.record.records import read_audit
    from hf_rksp.report import plots

    png = (fx["good"] / "spectrum.png").read_bytes()
    monkeypatch.setattr(plots, "drawn", lambda fn, audit: png)  # the PNGs are not what is tested: skip drawing
    newer = tmp_path / "newer.json"
    newer.write_text(_newer(read_audit(fx["good"])).to_json())

    def run(n: int, out: Path) -> tuple[int, str]:
        if earlier:
            shutil.copytree(fx["good_out"], out)
        with monkeypatch.context() as m:
            count = _interrupt_at(m, n)
            rc, _, err = _run(["audit", "--from-audit", str(newer), "--out-dir", str(out), "-q"], capfd)
        return rc, err, count[0]

    rc, _, n_steps = run(10**6, tmp_path / "probe")
    assert rc == 0 and n_steps >= 20, n_steps
    said = set()
    for n in range(1, n_steps + 1):
        out = tmp_path / f"o{n}" / "out"
        out.parent.mkdir()
        rc, err, _ = run(n, out)
        lines = err.strip().splitlines()
        assert rc == 130 and len(lines) == 1 and lines[0].startswith("hf-rksp: interrupted"), (n, err)
        line = lines[0]
        if not out.exists():
            state = "absent"
        else:
            _assert_pair(out, "either")  # the same run's audit and card, nothing hidden left
            state = "new" if json.loads((out / "audits" / fx["slug"] / "audit.json").read_text())["created"].startswith(
                "2099") else "earlier"
        before = tree_hash(out)
        recover(out) if out.exists() else None
        assert tree_hash(out) == before, f"step {n}: a publish was left pending"
        if "hold the new audit" in line:
            assert state == "new", (n, line)
            assert ("replaced the earlier one" in line) == earlier, (n, line)
        elif "still hold the earlier audit, unchanged" in line or "wrote nothing" in line:
            assert state == ("earlier" if earlier else "absent"), (n, line)
        else:  # true of a fresh folder, and of one whose earlier audit is untouched
            assert re.fullmatch(r"hf-rksp: interrupted; nothing was written", line), (n, line)
            assert state == ("earlier" if earlier else "absent"), (n, line)
        said.add(state)
    assert said == {"new", "earlier" if earlier else "absent"}  # Ctrl-C landed before and after the switch


def test_output_name_is_checked_before_the_model_loads(fx, tmp_path, monkeypatch, capfd):
    """A name that cannot be written fails before any model is loaded or calibrated (issue 29: it failed only
    after the whole audit had run).  Under issue 27's slug rule a local folder always gives a valid name, so
    the names here are a hub GGUF file's (from the fixture's HF cache) at a long revision."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _hub_cache(fx, tmp_path / "out", monkeypatch)
    gguf = [fx["long_gguf"], "--revision", fx["long_rev"]]
    for argv in (gguf, [*gguf, "--stream"], [*gguf, "--init"], [*gguf, "--low-disk"]):
        rc, _, err = _run(["audit", *argv, *SMALL, "--out-dir", str(tmp_path / "out")], capfd)
        assert rc == 2 and "error: the audit's output name" in err and "too late" not in err, err
    assert not (tmp_path / "out").exists()


def test_resume_after_sigkill(fx, tmp_path):
    """A streamed audit SIGKILLed after block 1's progress is saved resumes (a new process) to the same blocks."""
    out = tmp_path / "out"
    argv = ["audit", str(fx["tok"]), *STREAM, "--out-dir", str(out)]
    reference = tmp_path / "ref"
    assert main(["audit", str(fx["tok"]), *STREAM, "--out-dir", str(reference)]) == 0
    script = (
        "import os, signal, sys\n"
        "from hf_rksp import streaming\n"
        "real = streaming.ResumeState.save\n"
        "def save(self, nxt, *a):\n"
        "    real(self, nxt, *a)\n"
        "    if nxt == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
        "streaming.ResumeState.save = save\n"
        "from hf_rksp.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[1]))
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert list((out / "audits" / ".partial").glob("*/progress.json"))
    slug = _slug(reference)
    assert not (out / "audits" / slug).exists()
    assert main(argv) == 0
    got = json.loads((out / "audits" / slug / "audit.json").read_text())
    want = json.loads((reference / "audits" / slug / "audit.json").read_text())
    assert got["timings"]["resumed_at_block"] == 2
    assert got["blocks"] == want["blocks"]
    assert not (out / "audits" / ".partial").exists()


def _optional_keys(schema: dict, data: dict, at: tuple = ()):
    """Paths of the keys ``data`` has that ``schema`` does not require (the first block's included)."""
    for k, sub in schema.get("properties", {}).items():
        if k in data and k not in schema.get("required", ()):
            yield (*at, k)
        if k == "blocks":
            yield from _optional_keys(sub["items"], data[k][0], (*at, k, "0"))
        elif isinstance(data.get(k), dict):
            yield from _optional_keys(sub, data[k], (*at, k))


def test_every_optional_key_may_be_absent(fx, tmp_path, capfd):
    """An audit without any one of its optional keys re-renders and compares (the card reads none blindly)."""
    from hf_rksp.record.records import audit_schema

    data = json.loads((fx["good"] / "audit.json").read_text())
    paths = list(_optional_keys(audit_schema(), data))
    assert len(paths) >= 5, paths
    for i, path in enumerate(paths):
        f = tmp_path / f"{i}.json"
        f.write_text(_with(data, ".".join(path), KeyError))
        for argv in (["audit", "--from-audit", str(f), "--out-dir", str(tmp_path / f"o{i}")],  # each its own
                     ["compare", str(f), str(fx["good"]), "--json"]):
            rc, _, err = _run(argv, capfd)
            assert rc == 0, f"without {'.'.join(path)}: {argv[0]} exits {rc}: {err}"


def test_text_is_tokenized_incrementally(fx, monkeypatch):
    """20 MB of --text for 128 tokens: the tokenizer sees a prefix of about TEXT_CHUNK characters, not the file."""
    from transformers import AutoTokenizer

    from hf_rksp.capture import calibration as cal

    tok = AutoTokenizer.from_pretrained(fx["tok"])
    seen = []
    real = type(tok).__call__
    monkeypatch.setattr(type(tok), "__call__", lambda self, text, **k: seen.append(len(text)) or real(self, text, **k))
    calib = cal.from_file(fx["bigtext"], tok, 128, 64)
    assert calib.n_tokens == 128 and max(seen) <= cal.TEXT_CHUNK
    whole = fx["bigtext"].read_text()
    assert calib.detail["text_sha256"] == hashlib.sha256(whole.encode()).hexdigest()
    head = real(tok, whole[: 4 * cal.TEXT_CHUNK], add_special_tokens=False)["input_ids"][:128]
    assert calib.input_ids.flatten().tolist() == head  # the ids the whole text gives


def test_concurrent_audits_into_one_folder(fx, tmp_path):
    """Issue 27: three processes publish into one output folder at once (two other audits of the same
    checkpoint, and a refresh of the audit already there): each exits 0 with no error line, each audit and
    card is whole and readable, and no staging folder, backup or journal is left behind (the publish lock)."""
    from hf_rksp.record.records import read_audit

    out = tmp_path / "out"
    shutil.copytree(fx["good_out"], out)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[1]), OMP_NUM_THREADS="1")
    runs = [("audit", str(fx["tok"]), *SMALL, "--seed", "1"), ("audit", str(fx["tok"]), *SMALL, "--seed", "2"),
            ("audit", "--from-audit", str(fx["good"]))]
    procs = [subprocess.Popen([sys.executable, "-m", "hf_rksp", *argv, "--out-dir", str(out)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for argv in runs]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errs
    assert not any("error" in e for e in errs), errs
    slugs = {slug_of(*argv[1:]) for argv in runs[:2]} | {fx["slug"]}
    assert len(slugs) == 3
    for slug in slugs:
        assert read_audit(out / "audits" / slug).slug == slug
        assert (out / "model_cards" / slug / "README.md").is_file()
    leftovers = [p.name for d in ("audits", "model_cards") for p in (out / d).iterdir() if p.name not in slugs]
    assert leftovers == [], leftovers


# ----------------------------------------------------------------------------- 13. the Python API (issue 27)
# Wrong shapes, dtypes and NaN tensors, wrong types and values given to the library's entry points: each
# raises a typed error of hf_rksp.errors (a TypeError only for an unknown keyword, as Python does), one line,
# naming the parameter, before or instead of the linear-algebra library's own error.


@dataclass(frozen=True)
class ApiCase:
    """One row: ``call()`` must raise ``error`` with a message matching ``match`` (one line)."""

    id: str
    call: object
    error: str  # the class name in hf_rksp.errors (or "TypeError")
    match: str


def _snapshots(n: int = 200, d: int = 16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def _with_value(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t[3, 3] = value
    return t


def _tiny_model(nan_block: int | None = None):
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config("gpt2")).eval()
    if nan_block is not None:
        with torch.no_grad():
            model.h[nan_block].attn.c_attn.weight.fill_(float("nan"))
    return model


def _profile(x, y, **kw):
    from hf_rksp import profile_block

    return profile_block(x, y, **kw)


def _audit(source, **kw):
    from hf_rksp import audit

    return audit(source, **{"out_dir": None, "progress": False, "tokens": 128, "seq_len": 64, **kw})


def _kss(**kw):
    from hf_rksp import KSSConfig

    return KSSConfig(**kw)


def _rksp(**kw):
    from hf_rksp import RKSPConfig

    return RKSPConfig(**kw)


X, Y = _snapshots()
API_CASES = [
    ApiCase("profile-block-shapes-differ", lambda: _profile(X, Y[:, :8]), "SnapshotError",
            r"two \(N x d\) matrices of one shape, got \(200, 16\) and \(200, 8\)"),
    ApiCase("profile-block-rows-differ", lambda: _profile(X, Y[:100]), "SnapshotError", r"of one shape"),
    ApiCase("profile-block-1d", lambda: _profile(X[:, 0], Y[:, 0]), "SnapshotError", r"got \(200,\) and \(200,\)"),
    ApiCase("profile-block-3d", lambda: _profile(X[None], Y[None]), "SnapshotError", r"got \(1, 200, 16\)"),
    ApiCase("profile-block-nan-x", lambda: _profile(_with_value(X, float("nan")), Y), "SnapshotError",
            r"must be finite; `x` holds 1 NaN/inf"),
    ApiCase("profile-block-inf-y", lambda: _profile(X, _with_value(Y, float("inf"))), "SnapshotError",
            r"must be finite; `y` holds 1 NaN/inf"),
    ApiCase("profile-block-nan-bfloat16", lambda: _profile(_with_value(X, float("nan")).bfloat16(), Y.bfloat16()),
            "SnapshotError", r"`x` holds 1 NaN/inf"),
    ApiCase("profile-block-complex", lambda: _profile(X.to(torch.complex64), Y.to(torch.complex64)), "SnapshotError",
            r"must be real; `x` is torch\.complex64"),
    ApiCase("profile-block-lists", lambda: _profile(X.tolist(), Y.tolist()), "SnapshotError",
            r"must be torch tensors; `x` is a list"),
    ApiCase("profile-block-numpy", lambda: _profile(X.numpy(), Y), "SnapshotError", r"`x` is a ndarray"),
    ApiCase("profile-block-one-token", lambda: _profile(X[:1], Y[:1]), "SnapshotError", r"at least 2 token states"),
    ApiCase("profile-block-constant", lambda: _profile(torch.ones(200, 16), torch.ones(200, 16)), "SnapshotError",
            r"constant"),
    ApiCase("profile-block-config-dict", lambda: _profile(X, Y, config={"eps": 1e-6}), "ConfigError",
            r"config must be an RKSPConfig"),
    ApiCase("audit-module-nan-weight", lambda: _audit(_tiny_model(nan_block=1)), "NonFiniteActivationError",
            r"non-finite values \(NaN/inf\) in the residual stream leaving block 1"),
    ApiCase("audit-tensor-source", lambda: _audit(torch.zeros(3)), "ConfigError",
            r"`source` must be a hub id, a path or a model \(nn\.Module\), got a Tensor; profile .*profile_block"),
    ApiCase("audit-int-source", lambda: _audit(5), "ConfigError", r"`source` must be .* got a int"),
    ApiCase("audit-linear-module", lambda: _audit(torch.nn.Linear(4, 4)), "ConfigError",
            r"`source` is a Linear without a transformers config"),
    ApiCase("audit-tokenizer-not-callable", lambda: _audit(_tiny_model(), tokenizer=object()), "ConfigError",
            r"`tokenizer` must be a transformers tokenizer, got a object"),
    ApiCase("audit-module-seq-len-beyond-positions", lambda: _audit(_tiny_model(), tokens=1024, seq_len=1024),
            "ConfigError", r"`seq_len` 1024 exceeds the model's 256 positions"),
    ApiCase("audit-tokens-1", lambda: _audit(_tiny_model(), tokens=1), "ConfigError", r"`tokens`: must be between 2"),
    ApiCase("audit-tokens-string", lambda: _audit(_tiny_model(), tokens="many"), "ConfigError",
            r"`tokens`: must be an integer, got 'many'"),
    ApiCase("audit-lr-nan", lambda: _audit(_tiny_model(), lr=float("nan")), "ConfigError",
            r"`lr`: must be a finite positive number, got nan"),
    ApiCase("audit-unknown-option", lambda: _audit(_tiny_model(), tokenz=5), "TypeError",
            r"audit\(\) got unknown options \['tokenz'\]"),
    ApiCase("audit-init-with-module", lambda: _audit(_tiny_model(), init=True), "ConfigError",
            r"`init`/`config` build a model"),
    ApiCase("kss-T-0", lambda: _kss(T=0), "ConfigError", r"`T` must be > 0, got 0 \(KSSConfig\)"),
    ApiCase("kss-T-nan", lambda: _kss(T=float("nan")), "ConfigError", r"`T` must be > 0, got nan"),
    ApiCase("kss-tau-l-above-1", lambda: _kss(tau_l=2.0), "ConfigError", r"need 0 < tau_l < 1 < tau_u"),
    ApiCase("kss-gamma-1.5", lambda: _kss(gamma=1.5), "ConfigError", r"`gamma` must be in \[0, 1\], got 1\.5"),
    ApiCase("kss-beta-negative", lambda: _kss(beta=-1.0), "ConfigError", r"`beta` must be >= 0, got -1\.0"),
    ApiCase("rksp-eps-0", lambda: _rksp(eps=0), "ConfigError", r"`eps` must be > 0, got 0"),
    ApiCase("rksp-eps-nan", lambda: _rksp(eps=float("nan")), "ConfigError", r"`eps` must be > 0, got nan"),
    ApiCase("rksp-rank-0", lambda: _rksp(rank=0), "ConfigError", r"`rank` must be full \(None\) or an integer >= 1"),
    ApiCase("rksp-band-upper-below-1", lambda: _rksp(band_upper=0.9), "ConfigError", r"`band_upper` must be above 1"),
    ApiCase("rksp-sketch-unknown", lambda: _rksp(sketch="x"), "ConfigError", r"`sketch` must be one of random, pod"),
]


@pytest.mark.parametrize("case", API_CASES, ids=[f"13-{c.id}" for c in API_CASES])
def test_api_bad_input(case: ApiCase):
    from hf_rksp import errors

    error = TypeError if case.error == "TypeError" else getattr(errors, case.error)
    with pytest.raises(error) as e:
        case.call()
    assert type(e.value) is error, f"{type(e.value).__name__}: {e.value}"
    assert case.error == "TypeError" or isinstance(e.value, errors.RKSPError)
    assert "\n" not in str(e.value) and re.search(case.match, str(e.value)), str(e.value)


def test_api_table_has_its_rows():
    assert len(API_CASES) >= 30 and len({c.id for c in API_CASES}) == len(API_CASES)
