"""Voice libraries (the released prompt_audios.json form) and task files (test_tasks.json)."""

import json

import pytest

from unimoe_ray.inference.tasks import TaskError, TaskRequest, read_task_file
from unimoe_ray.inference.voices import VoiceError, VoiceLibrary

RELEASED = {
    "audio_prompts": {
        "english": {
            "female": {"prompt": "They're calling to us.", "audio_path": "assets/prompt_audios/en_female.wav"},
            "male": {"prompt": "Using script blockers.", "audio_path": "assets/prompt_audios/en_male.wav"},
        },
        "chinese": {"male": {"prompt": "小偷却一点也不气馁。", "audio_path": "assets/prompt_audios/zh_male.wav"}},
    },
    "metadata": {"version": "1.0"},
}


def test_released_library_names_and_paths(tmp_path):
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "prompt_audios.json").write_text(json.dumps(RELEASED, ensure_ascii=False))
    (tmp_path / "assets" / "prompt_audios").mkdir(parents=True)
    (tmp_path / "assets" / "prompt_audios" / "en_male.wav").write_bytes(b"RIFF")
    lib = VoiceLibrary.load(tmp_path / "examples" / "prompt_audios.json", root=tmp_path)
    assert lib.names() == ["chinese_male", "english_female", "english_male"]
    v = lib.get("English Male")  # the web demo's spelling
    assert v.audio_path == tmp_path / "assets/prompt_audios/en_male.wav" and v.transcript == "Using script blockers."
    assert v.language == "english" and v.gender == "male"
    with pytest.raises(VoiceError, match="unknown voice 'martian'.*english_male"):
        lib.get("martian")
    with pytest.raises(VoiceError, match="does not exist.*root"):
        lib.get("english_female")  # listed, but its file is not there


def test_bad_libraries(tmp_path):
    with pytest.raises(VoiceError, match="does not exist"):
        VoiceLibrary.load(tmp_path / "nope.json")
    (tmp_path / "a.json").write_text("[1, 2]")
    with pytest.raises(VoiceError, match="audio_prompts"):
        VoiceLibrary.load(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"voices": {"x": {"audio_path": "x.wav"}}}))
    with pytest.raises(VoiceError, match="'prompt'"):
        VoiceLibrary.load(tmp_path / "b.json")


def test_task_file_forms_and_checks(tmp_path):
    released = [
        {"task_type": "text_to_music", "task_id": "m", "caption": "jazz", "output_path": "./out/music"},
        {
            "task_type": "text_to_speech",
            "task_id": "s",
            "target_text": "hi",
            "reference_audio": "r.wav",
            "reference_text": "me",
            "output_path": "./out/speech",
        },
    ]
    (tmp_path / "t.json").write_text(json.dumps(released))
    (tmp_path / "t.jsonl").write_text(json.dumps(released[0]) + "\n{broken\n")
    assert read_task_file(tmp_path / "t.json") == released
    items = read_task_file(tmp_path / "t.jsonl")
    assert items[0] == released[0] and "line 2 is not JSON" in items[1]["_error"]
    m = TaskRequest.from_released(released[0], 0, base=tmp_path)
    assert (m.task, m.text) == ("t2m", "jazz") and m.output_file() == tmp_path / "out/music/m.wav"
    m.check(None)
    s = TaskRequest.from_released(released[1], 1, base=tmp_path)
    with pytest.raises(TaskError, match="r.wav does not exist"):
        s.check(None)
    with pytest.raises(TaskError, match="task_type 'sing'"):
        TaskRequest.from_released({"task_type": "sing"}, 3)
    with pytest.raises(TaskError, match="caption is empty"):
        TaskRequest.from_released({"task_type": "text_to_music", "caption": " "}, 4).check(None)
    with pytest.raises(TaskError, match="needs video_path"):
        TaskRequest.from_released({"task_type": "video_text_to_music", "caption": "x"}, 5).check(None)
    with pytest.raises(TaskError, match="bad sampling option"):
        TaskRequest.from_released({"task_type": "text_to_music", "caption": "x", "sampling": {"topk": 3}}, 6).check(
            None
        )
