"""push_to_hub and save_pretrained(push_to_hub=True): the upload is captured at huggingface_hub's API
boundary (HfApi's methods), no network."""

import pytest
import torch
from huggingface_hub import CommitInfo, HfApi, RepoUrl

import hyclora_models as H

from .helpers import hyc_and_peft, save_tiny

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "hyclora_config.json", "README.md"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def hyc(base):
    return hyc_and_peft(base, bits=4)[0]


@pytest.fixture
def hub(monkeypatch):
    """Replaces HfApi's create_repo / create_branch / create_commit; records the calls and the committed
    files' bytes (read at commit time: push_to_hub's temporary directory is gone afterwards)."""
    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, dict(kw, token=self.token)))
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'me/' + repo_id}")

    def create_branch(self, repo_id, **kw):
        calls.append(("create_branch", repo_id, kw))

    def create_commit(self, repo_id, operations, **kw):
        files = {}
        for op in operations:
            with open(op.path_or_fileobj, "rb") as f:
                files[op.path_in_repo] = f.read()
        calls.append(("create_commit", repo_id, dict(kw, files=files, token=self.token)))
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/abc",
                          commit_message=kw["commit_message"], commit_description="", oid="abc")

    for name, fn in [("create_repo", create_repo), ("create_branch", create_branch), ("create_commit", create_commit)]:
        monkeypatch.setattr(HfApi, name, fn)
    return calls


def commits(calls):
    return [c for c in calls if c[0] == "create_commit"]


def write(files, directory):
    directory.mkdir()
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


def test_push_to_hub_uploads_the_adapter_in_one_commit(hyc, base, hub, tmp_path):
    info = hyc.push_to_hub("me/tiny-adapter", private=True, token="tok", create_pr=True)
    assert hub[0] == ("create_repo", "me/tiny-adapter",
                      dict(private=True, exist_ok=True, repo_type="model", token="tok"))
    [(_, repo_id, commit)] = commits(hub)
    assert repo_id == "me/tiny-adapter" and commit["token"] == "tok" and commit["create_pr"] is True
    assert commit["commit_message"] == "Upload LoRA adapter" and commit["revision"] is None
    assert set(commit["files"]) == ADAPTER_FILES  # the adapter only: no base weights, no config.json
    assert isinstance(info, CommitInfo) and info.oid == "abc"

    again = H.HyCLlamaForCausalLM.from_pretrained(write(commit["files"], tmp_path / "pulled"), base_model=base)
    lora = {n: p for n, p in hyc.named_parameters() if ".lora_" in n}
    assert lora and all(torch.equal(p, dict(again.named_parameters())[n]) for n, p in lora.items())


def test_push_to_hub_passes_message_and_branch(hyc, hub):
    hyc.push_to_hub("tiny-adapter", "my message", revision="dev", commit_description="why", max_shard_size="1GB")
    assert [c[0] for c in hub] == ["create_repo", "create_branch", "create_commit"]
    assert hub[1][1:] == ("me/tiny-adapter", dict(branch="dev", exist_ok=True, repo_type="model"))
    [(_, repo_id, commit)] = commits(hub)  # the namespaced id create_repo returned
    assert repo_id == "me/tiny-adapter" and commit["revision"] == "dev" and commit["create_pr"] is False
    assert commit["commit_message"] == "my message" and commit["commit_description"] == "why"


def test_save_pretrained_push_to_hub_saves_and_pushes_the_same_files(hyc, hub, tmp_path):
    out = tmp_path / "my-adapter"
    hyc.save_pretrained(out, push_to_hub=True, commit_message="msg", token="tok")
    assert hub[0][1] == "my-adapter"  # repo_id defaults to the directory's name
    [(_, _, commit)] = commits(hub)
    assert commit["commit_message"] == "msg" and commit["token"] == "tok"
    assert set(commit["files"]) == ADAPTER_FILES  # Trainer's copy of the weights stays local
    assert {p.name for p in out.iterdir()} == ADAPTER_FILES | {"model.safetensors"}
    assert all((out / name).read_bytes() == data for name, data in commit["files"].items())

    (out / "notes.txt").write_text("not part of the adapter")
    hyc.save_pretrained(out, push_to_hub=True, repo_id="org/other")
    (_, repo_id, commit) = commits(hub)[-1]
    assert repo_id == "org/other" and set(commit["files"]) == ADAPTER_FILES
