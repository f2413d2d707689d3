import pytest

from turbo_serve.jobs.storage import Storage, input_key, output_key


@pytest.mark.parametrize(
    "key",
    ["../escape.mp4", "a/../../escape", "/etc/passwd", "", ".hidden", "a//b", "a/./b", "sp ace", "a\\..\\b", "x/..", None],
)
def test_keys_cannot_escape_or_be_odd(tmp_path, key):
    storage = Storage(tmp_path / "root")
    with pytest.raises(ValueError, match="storage key"):
        storage.path(key)


def test_symlink_out_of_the_root_is_refused(tmp_path):
    storage = Storage(tmp_path / "root")
    (storage.root / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="outside the storage folder"):
        storage.path("link/secret")


def test_write_read_delete_round_trip(tmp_path):
    storage = Storage(tmp_path / "root")
    key = input_key("video_1", "png")
    storage.write_bytes(key, b"data")
    assert storage.exists(key) and storage.path(key).read_bytes() == b"data"
    storage.delete(key)
    assert not storage.exists(key) and not (storage.root / "video_1").exists()
    assert storage.root.exists()


def test_write_via_publishes_only_complete_files(tmp_path):
    storage = Storage(tmp_path / "root")
    key = output_key("video_2", "t2v_0_tiny.mp4")

    def broken_writer(path):
        path.write_bytes(b"half")
        raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError):
        storage.write_via(key, broken_writer)
    assert not storage.exists(key) and not list(storage.root.rglob(".partial-*"))
    storage.write_via(key, lambda path: path.write_bytes(b"whole"))
    assert storage.path(key).read_bytes() == b"whole"
