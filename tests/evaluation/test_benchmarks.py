"""Native benchmark annotation files -> records (flamingo_cli.evaluation.benchmarks)."""
import json
import shutil
from pathlib import Path

import pytest

from flamingo_cli.formats.artifacts import ArtifactError
from flamingo_cli.evaluation.benchmarks import (
    BENCHMARKS,
    TASKS,
    imagenet_classnames,
    read_benchmark,
    sample,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "benchmarks"


VIDEO_BENCHMARKS = ("msvdqa", "msrvttqa", "ivqa", "nextqa", "star", "vatex", "youcook2", "rareact")


def root(name: str) -> Path:
    return FIXTURES / name


def ids(records):
    return [r["id"] for r in records]


def copy_fixture(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root(name), tmp_path / name))


# -- registry ---------------------------------------------------------------------------

def test_registry():
    assert set(BENCHMARKS) == {"vqav2", "okvqa", "vizwiz", "textvqa", "coco", "flickr30k", "hatefulmemes", "imagenet",
                               "msvdqa", "msrvttqa", "ivqa", "nextqa", "star", "vatex", "youcook2", "rareact",
                               "visdial"}
    for name, bench in BENCHMARKS.items():
        assert bench.name == name
        assert bench.task in TASKS
        assert bench.splits and bench.description
    assert BENCHMARKS["coco"].splits == ("train", "val", "test")
    assert BENCHMARKS["hatefulmemes"].splits == ("train", "dev_seen", "dev_unseen", "test_seen", "test_unseen")
    assert BENCHMARKS["vqav2"].splits == ("train", "val", "test-dev", "test")
    assert BENCHMARKS["vizwiz"].splits == BENCHMARKS["textvqa"].splits == ("train", "val", "test")


@pytest.mark.parametrize("name,split,expected", [
    ("vqav2", "train", 3), ("vqav2", "val", 3), ("vqav2", "test-dev", 2), ("vqav2", "test", 4),
    ("okvqa", "train", 2), ("okvqa", "val", 2),
    ("vizwiz", "train", 2), ("vizwiz", "val", 3), ("vizwiz", "test", 3),
    ("textvqa", "train", 2), ("textvqa", "val", 2), ("textvqa", "test", 2),
    ("coco", "train", 2), ("coco", "val", 2), ("coco", "test", 2),
    ("flickr30k", "train", 2), ("flickr30k", "val", 1), ("flickr30k", "test", 2),
    ("hatefulmemes", "train", 3), ("hatefulmemes", "dev_seen", 2), ("hatefulmemes", "test_unseen", 2),
    ("imagenet", "val", 3),
    ("msvdqa", "train", 2), ("msvdqa", "test", 2), ("msrvttqa", "val", 2), ("msrvttqa", "test", 3),
    ("ivqa", "val", 1), ("ivqa", "test", 2), ("nextqa", "val", 4), ("nextqa", "test", 1), ("star", "val", 2), ("star", "test", 1),
    ("vatex", "val", 2), ("vatex", "test", 1), ("youcook2", "train", 1), ("youcook2", "val", 2),
    ("rareact", "test", 6),
])
def test_common_schema(name, split, expected):
    records = read_benchmark(name, root(name), split)
    assert len(records) == expected
    assert len(set(ids(records))) == len(records)
    for r in records:
        assert r["id"].startswith(f"{name}-")
        assert r["split"] == split
        media = r.get("video") if name in VIDEO_BENCHMARKS else r["image"]
        assert isinstance(media, str) and media.startswith(str(root(name)))
    json.dumps(records)  # JSON-able


# -- VQA --------------------------------------------------------------------------------

def test_vqav2(tmp_path):
    r = root("vqav2")
    records = read_benchmark("vqav2", r, "val")
    assert records[0] == {
        "id": "vqav2-262148000",
        "image": str(r / "val2014" / "COCO_val2014_000000262148.jpg"),
        "split": "val",
        "question": "Where is he looking?",
        "answers": ["down", "down", "at table", "skateboard", "down", "table", "down", "down", "down", "down"],
        "answer": "down",
        "question_id": 262148000,
        "question_type": "none of the above",
        "answer_type": "other",
    }
    assert ids(records) == ["vqav2-262148000", "vqav2-262148001", "vqav2-393225000"]
    assert [r["answer_type"] for r in records] == ["other", "number", "yes/no"]
    train = read_benchmark("vqav2", str(r), "train")  # a str root works too
    assert ids(train) == ["vqav2-458752000", "vqav2-458752001", "vqav2-262146000"]
    assert train[0]["image"] == str(r / "train2014" / "COCO_train2014_000000458752.jpg")
    assert train[0]["answer"] == "net" and "netting" in train[0]["answers"]


def test_okvqa():
    r = root("okvqa")
    records = read_benchmark("okvqa", r, "val")
    assert records[1] == {
        "id": "okvqa-3932825",
        "image": str(r / "val2014" / "COCO_val2014_000000393282.jpg"),
        "split": "val",
        "question": "Which country is this famous clock tower in?",
        "answers": ["england", "england", "england", "england", "uk", "uk", "london", "london", "britain", "britain"],
        "answer": "england",
        "question_id": 3932825,
        "question_type": "seven",  # OK-VQA's knowledge category
        "answer_type": "other",
    }
    assert ids(records) == ["okvqa-2971475", "okvqa-3932825"]
    train = read_benchmark("okvqa", r, "train")
    assert ids(train) == ["okvqa-516065", "okvqa-2225625"]
    assert train[0]["image"] == str(r / "train2014" / "COCO_train2014_000000051606.jpg")


def test_vizwiz_most_frequent_answer_with_tie():
    r = root("vizwiz")
    records = read_benchmark("vizwiz", r, "val")
    # "unanswerable" and "soup" occur 4 times each; "unanswerable" occurs first
    assert records[0] == {
        "id": "vizwiz-VizWiz_val_00000000",
        "image": str(r / "val" / "VizWiz_val_00000000.jpg"),
        "split": "val",
        "question": "Ok. There is another picture I hope it is a better one.",
        "answers": ["unanswerable", "soup", "unanswerable", "soup", "unanswerable", "chicken soup", "soup",
                    "unanswerable", "soup", "cream of chicken"],
        "answer": "unanswerable",
        "question_id": "VizWiz_val_00000000.jpg",
        "answer_type": "unanswerable",
    }
    assert [x["answer"] for x in records] == ["unanswerable", "night time", "blue"]
    assert [x["answer_type"] for x in records] == ["unanswerable", "other", "other"]
    train = read_benchmark("vizwiz", r, "train")
    assert ids(train) == ["vizwiz-VizWiz_train_00000000", "vizwiz-VizWiz_train_00000001"]
    assert train[0]["image"] == str(r / "train" / "VizWiz_train_00000000.jpg")
    assert [x["answer"] for x in train] == ["basil leaves", "coca cola"]


def test_textvqa_most_frequent_answer_with_tie():
    r = root("textvqa")
    records = read_benchmark("textvqa", r, "val")
    # "budweiser" and "bud light" occur 4 times each; "budweiser" occurs first
    assert records[0] == {
        "id": "textvqa-34602",
        "image": str(r / "train_images" / "003a8ae2ef43b901.jpg"),
        "split": "val",
        "question": "what is the brand of this beer?",
        "answers": ["budweiser", "bud light", "bud light", "budweiser", "budweiser", "bud light", "bud",
                    "budweiser", "bud light", "beer"],
        "answer": "budweiser",
        "question_id": 34602,
    }
    assert ids(records) == ["textvqa-34602", "textvqa-34603"]
    train = read_benchmark("textvqa", r, "train")
    assert ids(train) == ["textvqa-0", "textvqa-3"]
    assert [x["answer"] for x in train] == ["nokia", "5:41"]
    assert train[0]["image"] == str(r / "train_images" / "0054c91397f2fe05.jpg")
    assert "answer_type" not in records[0]  # TextVQA has none


def test_vqav2_test_splits_have_questions_only():
    r = root("vqav2")
    dev = read_benchmark("vqav2", r, "test-dev")
    assert dev[0] == {
        "id": "vqav2-262144000",
        "image": str(r / "test2015" / "COCO_test2015_000000262144.jpg"),  # test-dev's images are test2015's
        "split": "test-dev",
        "question": "Is the ball flying towards the batter?",
        "question_id": 262144000,
    }
    assert ids(dev) == ["vqav2-262144000", "vqav2-524291000"]
    test = read_benchmark("vqav2", r, "test")
    assert [x["question_id"] for x in test] == [262144000, 262144001, 131074000, 524291000]
    assert all(set(x) == {"id", "image", "split", "question", "question_id"} for x in dev + test)


def test_vizwiz_and_textvqa_test_splits_have_questions_only():
    viz = read_benchmark("vizwiz", root("vizwiz"), "test")
    assert viz[1] == {
        "id": "vizwiz-VizWiz_test_00000001",
        "image": str(root("vizwiz") / "test" / "VizWiz_test_00000001.jpg"),
        "split": "test",
        "question": "Can you tell me what color this shirt is?",
        "question_id": "VizWiz_test_00000001.jpg",
    }
    text = read_benchmark("textvqa", root("textvqa"), "test")
    assert text[0] == {
        "id": "textvqa-39602",
        "image": str(root("textvqa") / "test_images" / "000a1249af2bc5f0.jpg"),
        "split": "test",
        "question": "what is the name of the store?",
        "question_id": 39602,
    }


def test_answers_are_still_required_outside_the_test_splits(tmp_path):
    r = copy_fixture("vizwiz", tmp_path)
    items = json.loads((r / "Annotations" / "val.json").read_text())
    del items[2]["answers"]
    (r / "Annotations" / "val.json").write_text(json.dumps(items))
    with pytest.raises(ArtifactError,
                       match=r"val\.json: item 2 \(VizWiz_val_00000002\.jpg\) lacks required field 'answers'"):
        read_benchmark("vizwiz", r, "val")
    r = copy_fixture("textvqa", tmp_path)
    data = json.loads((r / "TextVQA_0.5.1_val.json").read_text())
    del data["data"][0]["answers"]
    (r / "TextVQA_0.5.1_val.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"question 34602 lacks required field 'answers'"):
        read_benchmark("textvqa", r, "val")


def test_a_wrongly_typed_answer_type_is_an_error(tmp_path):
    r = copy_fixture("vqav2", tmp_path)
    path = r / "v2_mscoco_val2014_annotations.json"
    data = json.loads(path.read_text())
    data["annotations"][1]["answer_type"] = 7
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"annotation of question 262148001 field 'answer_type' should be a str"):
        read_benchmark("vqav2", r, "val")
    del data["annotations"][1]["answer_type"]  # absent: the record goes without it
    path.write_text(json.dumps(data))
    assert "answer_type" not in read_benchmark("vqav2", r, "val")[1]


# -- captioning -------------------------------------------------------------------------

def test_coco_karpathy_splits():
    r = root("coco")
    test = read_benchmark("coco", r, "test")
    assert test[0] == {
        "id": "coco-391895",
        "image": str(r / "val2014" / "COCO_val2014_000000391895.jpg"),
        "split": "test",
        "caption": "A man with a red helmet on a small moped on a dirt road.",
        "captions": [
            "A man with a red helmet on a small moped on a dirt road.",
            "Man riding a motor bike on a dirt road on the countryside.",
            "A man riding on the back of a motorcycle.",
            ("A dirt path with a young person on a motor bike rests to the foreground of a verdant area with a "
             "bridge and a background of cloud-wreathed mountains."),
            "A man in a red shirt and a red hat is on a motorcycle on a hill side.",
        ],
        "image_id": 391895,
    }
    assert ids(test) == ["coco-391895", "coco-60623"]
    # train is Karpathy "train" plus "restval"
    train = read_benchmark("coco", r, "train")
    assert ids(train) == ["coco-57870", "coco-522418"]
    assert train[0]["image"] == str(r / "train2014" / "COCO_train2014_000000057870.jpg")
    assert train[1]["image"] == str(r / "val2014" / "COCO_val2014_000000522418.jpg")
    assert train[1]["caption"] == "A woman wearing a net on her head cutting a cake."
    assert ids(read_benchmark("coco", r, "val")) == ["coco-184613", "coco-309022"]
    assert all(len(x["captions"]) == 5 for x in train + test)


def test_flickr30k():
    r = root("flickr30k")
    val = read_benchmark("flickr30k", r, "val")
    assert val == [{
        "id": "flickr30k-1007129816",
        "image": str(r / "flickr30k-images" / "1007129816.jpg"),
        "split": "val",
        "caption": "A man with pierced ears is wearing glasses and an orange hat.",
        "captions": [
            "A man with pierced ears is wearing glasses and an orange hat.",
            "A man with glasses is wearing a beer can crocheted hat.",
            "A man with gauges and glasses is wearing a Blitz hat.",
            "A man in an orange hat starring at something.",
            "A man wears an orange hat and glasses.",
        ],
        "image_id": "1007129816",
    }]
    assert ids(read_benchmark("flickr30k", r, "train")) == ["flickr30k-1000092795", "flickr30k-10002456"]
    assert ids(read_benchmark("flickr30k", r, "test")) == ["flickr30k-1009434119", "flickr30k-101362133"]


# -- Hateful Memes ----------------------------------------------------------------------

def test_hatefulmemes():
    r = root("hatefulmemes")
    train = read_benchmark("hatefulmemes", r, "train")
    assert train[2] == {
        "id": "hatefulmemes-13894",
        "image": str(r / "img" / "13894.png"),
        "split": "train",
        "text": "that face you make when the wifi goes down",
        "label": "yes",
        "label_id": 1,
    }
    assert [(x["label"], x["label_id"]) for x in train] == [("no", 0), ("no", 0), ("yes", 1)]
    dev = read_benchmark("hatefulmemes", r, "dev_seen")
    assert ids(dev) == ["hatefulmemes-8291", "hatefulmemes-46971"]
    assert dev[0]["image"] == str(r / "img" / "08291.png")
    # an unlabelled test split: no label fields
    test = read_benchmark("hatefulmemes", r, "test_unseen")
    assert test[0] == {
        "id": "hatefulmemes-16395",
        "image": str(r / "img" / "16395.png"),
        "split": "test_unseen",
        "text": "monday mornings be like",
    }
    assert all("label" not in x and "label_id" not in x for x in test)


# -- ImageNet ---------------------------------------------------------------------------

def test_imagenet_classnames():
    assert imagenet_classnames(root("imagenet")) == ["tench", "goldfish", "English springer", "kit fox"]


def test_imagenet_val():
    r = root("imagenet")
    val = read_benchmark("imagenet", r, "val")
    assert val[0] == {
        "id": "imagenet-ILSVRC2012_val_00008726",
        "image": str(r / "ILSVRC" / "Data" / "CLS-LOC" / "val" / "ILSVRC2012_val_00008726.JPEG"),
        "split": "val",
        "label": "kit fox",
        "synset": "n02119789",
    }
    assert ids(val) == ["imagenet-ILSVRC2012_val_00008726", "imagenet-ILSVRC2012_val_00018706",
                        "imagenet-ILSVRC2012_val_00039290"]
    assert [x["label"] for x in val] == ["kit fox", "tench", "English springer"]


def test_imagenet_train_from_folders(tmp_path):
    r = copy_fixture("imagenet", tmp_path)
    train_dir = r / "ILSVRC" / "Data" / "CLS-LOC" / "train"
    for synset, files in {"n01443537": ["n01443537_2.JPEG", "n01443537_10.JPEG"],
                          "n01440764": ["n01440764_18.JPEG"]}.items():
        (train_dir / synset).mkdir(parents=True)
        for f in files:
            (train_dir / synset / f).touch()
    records = read_benchmark("imagenet", r, "train")
    assert records[0] == {
        "id": "imagenet-n01440764_18",
        "image": str(train_dir / "n01440764" / "n01440764_18.JPEG"),
        "split": "train",
        "label": "tench",
        "synset": "n01440764",
    }
    # folders and files listed sorted
    assert ids(records) == ["imagenet-n01440764_18", "imagenet-n01443537_10", "imagenet-n01443537_2"]
    assert [x["label"] for x in records] == ["tench", "goldfish", "goldfish"]

    (train_dir / "n09999999").mkdir()
    with pytest.raises(ArtifactError, match="n09999999"):
        read_benchmark("imagenet", r, "train")


def test_imagenet_train_missing_folder():
    with pytest.raises(ArtifactError, match="train: no such directory"):
        read_benchmark("imagenet", root("imagenet"), "train")


def test_imagenet_unknown_synset(tmp_path):
    r = copy_fixture("imagenet", tmp_path)
    (r / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n09999999 1 2 3 4\n")
    with pytest.raises(ArtifactError, match=r"LOC_val_solution\.csv: line 2: synset n09999999"):
        read_benchmark("imagenet", r, "val")


# -- errors -----------------------------------------------------------------------------

def test_unknown_benchmark_and_split():
    with pytest.raises(ArtifactError, match="unknown benchmark 'gqa'"):
        read_benchmark("gqa", root("vqav2"), "val")
    with pytest.raises(ArtifactError, match=r"vqav2 has no split 'test2015' \(splits: train, val, test-dev, test\)"):
        read_benchmark("vqav2", root("vqav2"), "test2015")
    with pytest.raises(ArtifactError, match="okvqa has no split 'test'"):  # OK-VQA has no test split
        read_benchmark("okvqa", root("okvqa"), "test")
    with pytest.raises(ArtifactError, match="no split 'restval'"):
        read_benchmark("coco", root("coco"), "restval")


@pytest.mark.parametrize("name,split,missing", [
    ("vqav2", "val", "v2_OpenEnded_mscoco_val2014_questions.json"),
    ("okvqa", "val", "OpenEnded_mscoco_val2014_questions.json"),
    ("vizwiz", "val", "val.json"),
    ("textvqa", "val", "TextVQA_0.5.1_val.json"),
    ("vqav2", "test-dev", "v2_OpenEnded_mscoco_test-dev2015_questions.json"),
    ("vizwiz", "test", "test.json"),
    ("textvqa", "test", "TextVQA_0.5.1_test.json"),
    ("coco", "val", "dataset_coco.json"),
    ("flickr30k", "val", "dataset_flickr30k.json"),
    ("hatefulmemes", "dev_unseen", "dev_unseen.jsonl"),  # this split has no fixture file
    ("imagenet", "val", "LOC_synset_mapping.txt"),
])
def test_missing_file(tmp_path, name, split, missing):
    with pytest.raises(ArtifactError, match=rf"{missing}: no such file") as e:
        read_benchmark(name, tmp_path, split)
    assert "\n" not in str(e.value)


def test_missing_annotations_file(tmp_path):
    r = copy_fixture("vqav2", tmp_path)
    (r / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(ArtifactError, match=r"v2_mscoco_val2014_annotations\.json: no such file"):
        read_benchmark("vqav2", r, "val")


@pytest.mark.parametrize("name,split,file", [
    ("vqav2", "val", "v2_mscoco_val2014_annotations.json"),
    ("vizwiz", "train", "Annotations/train.json"),
    ("textvqa", "train", "TextVQA_0.5.1_train.json"),
    ("coco", "val", "dataset_coco.json"),
])
def test_malformed_json(tmp_path, name, split, file):
    r = copy_fixture(name, tmp_path)
    path = r / file
    path.write_text(path.read_text()[:-40])  # truncated download
    with pytest.raises(ArtifactError, match=rf"{Path(file).name}: malformed JSON at line \d+"):
        read_benchmark(name, r, split)


def test_malformed_jsonl_line(tmp_path):
    r = copy_fixture("hatefulmemes", tmp_path)
    with open(r / "train.jsonl", "a") as f:
        f.write('{"id": 1, "img": "img/00001.png", "label": 0, "text": "unterminated\n')
    with pytest.raises(ArtifactError, match=r"train\.jsonl: line 4: malformed JSON"):
        read_benchmark("hatefulmemes", r, "train")


def test_question_without_annotation(tmp_path):
    r = copy_fixture("vqav2", tmp_path)
    path = r / "v2_mscoco_val2014_annotations.json"
    data = json.loads(path.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["question_id"] != 262148001]
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"v2_mscoco_val2014_annotations\.json: no annotation for question 262148001"):
        read_benchmark("vqav2", r, "val")


def test_missing_required_field(tmp_path):
    r = copy_fixture("textvqa", tmp_path)
    path = r / "TextVQA_0.5.1_val.json"
    data = json.loads(path.read_text())
    del data["data"][1]["question"]
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"TextVQA_0\.5\.1_val\.json: question 34603 lacks required field 'question'"):
        read_benchmark("textvqa", r, "val")

    r = copy_fixture("hatefulmemes", tmp_path)
    (r / "train.jsonl").write_text('{"id": 5, "img": "img/00005.png", "label": 0}\n')
    with pytest.raises(ArtifactError, match=r"train\.jsonl: line 1 lacks required field 'text'"):
        read_benchmark("hatefulmemes", r, "train")


def test_wrong_top_level_structure(tmp_path):
    r = copy_fixture("vizwiz", tmp_path)
    (r / "Annotations" / "val.json").write_text('{"images": []}')
    with pytest.raises(ArtifactError, match=r"val\.json: top level should be a list"):
        read_benchmark("vizwiz", r, "val")


# -- sample -----------------------------------------------------------------------------

def test_sample():
    records = [{"id": str(i)} for i in range(50)]
    a = sample(records, 10, seed=0)
    assert a == sample(records, 10, seed=0)  # deterministic
    assert len(a) == 10
    positions = [records.index(x) for x in a]
    assert positions == sorted(positions)  # input order kept
    assert ids(a) != ids(sample(records, 10, seed=1))  # differs across seeds
    assert sample(records, None, seed=0) == records
    assert sample(records, 50, seed=3) == records
    assert sample(records, 999, seed=3) == records
    assert sample(records, 0, seed=3) == []
    with pytest.raises(ArtifactError):
        sample(records, -1, seed=0)


def test_the_data_command_offers_every_benchmark():
    from flamingo_cli.cli.data import BENCHMARK_NAMES

    assert sorted(BENCHMARK_NAMES) == sorted(BENCHMARKS)


# -- video QA ---------------------------------------------------------------------------

def test_msvdqa_maps_video_ids_to_msvd_clips():
    records = read_benchmark("msvdqa", root("msvdqa"), "test")
    assert records == [
        {"id": "msvdqa-30933", "video": str(root("msvdqa") / "YouTubeClips" / "-8y1Q0rA3n8_108_115.avi"),
         "split": "test", "question": "what is running on the grass?", "answer": "dog", "label": "dog",
         "question_id": 30933, "video_id": 3},
        {"id": "msvdqa-30934", "video": str(root("msvdqa") / "YouTubeClips" / "-7KMZQEsJW4_205_208.avi"),
         "split": "test", "question": "who is dancing?", "answer": "woman", "label": "woman",
         "question_id": 30934, "video_id": 2},
    ]


def test_msvdqa_unknown_video_and_bad_mapping(tmp_path):
    copy = copy_fixture("msvdqa", tmp_path)
    (copy / "test_qa.json").write_text('[{"answer": "x", "id": 5, "question": "q?", "video_id": 42}]')
    with pytest.raises(ArtifactError, match="test_qa.json: video_id 42 is not in .*youtube_mapping.txt"):
        read_benchmark("msvdqa", copy, "test")
    (copy / "youtube_mapping.txt").write_text("clip-without-id\n")
    with pytest.raises(ArtifactError, match=r"youtube_mapping.txt: line 1: expected 'CLIP vidN'"):
        read_benchmark("msvdqa", copy, "train")


def test_msrvttqa_finds_train_val_and_test_clips():
    records = read_benchmark("msrvttqa", root("msrvttqa"), "test")
    assert [(r["id"], Path(r["video"]).relative_to(root("msrvttqa")).as_posix(), r["label"]) for r in records] == [
        ("msrvttqa-158581", "TestVideo/video7010.mp4", "music"),
        ("msrvttqa-158582", "TestVideo/video9999.mp4", "two"),
        ("msrvttqa-158583", "TestVideo/video7010.mp4", "man")]
    val = read_benchmark("msrvttqa", root("msrvttqa"), "val")
    assert Path(val[0]["video"]).relative_to(root("msrvttqa")).as_posix() == "TrainValVideo/video6513.mp4"


def test_ivqa_keeps_five_answers_and_the_clip_bounds():
    (record,) = read_benchmark("ivqa", root("ivqa"), "val")
    assert record == {"id": "ivqa-val-0", "video": str(root("ivqa") / "videos" / "zz9Q0aaBc1d.mp4"), "split": "val",
                      "question": "what colour, roughly?", "answers": ["red", "Red", "red.", "pink", "a red"],
                      "answer": "red", "video_id": "zz9Q0aaBc1d", "start": 0.0, "end": 10.5}
    test = read_benchmark("ivqa", root("ivqa"), "test")
    assert [r["answer"] for r in test] == ["onion", "knife"]  # knife and saw tie: the first


def test_ivqa_missing_column_and_empty_answer(tmp_path):
    (tmp_path / "test.csv").write_text("video_id,question,answer1\nv,q?,a\n")
    with pytest.raises(ArtifactError, match=r"test.csv: no column answer2, answer3, answer4, answer5"):
        read_benchmark("ivqa", tmp_path, "test")
    (tmp_path / "test.csv").write_text("video_id,question,answer1,answer2,answer3,answer4,answer5\nv,q?,a,b,c,,e\n")
    with pytest.raises(ArtifactError, match=r"test.csv: row 2: empty answer4"):
        read_benchmark("ivqa", tmp_path, "test")


def test_nextqa_maps_videos_and_adds_the_second_reference():
    records = read_benchmark("nextqa", root("nextqa"), "val")
    assert records[1] == {
        "id": "nextqa-3747890905-8", "video": str(root("nextqa") / "NExTVideo" / "0043" / "3747890905.mp4"),
        "split": "val", "question": "how does the adult get rid of the food residue near the end of the video",
        "answer": "uses the spoon", "answers": ["uses the spoon", "use a spoon"], "type": "CH",
        "question_id": "8", "video_id": "3747890905"}
    assert [r["answers"] for r in records] == [["no"], ["uses the spoon", "use a spoon"], ["push toy train"],
                                              ["nine", "nine"]]
    assert records[3]["question"] == "how many children are presented, roughly"  # a quoted CSV field
    (test,) = read_benchmark("nextqa", root("nextqa"), "test")  # no second-reference file for test
    assert test["answers"] == ["brown"] and test["type"] == "DO"


def test_nextqa_unmapped_video_and_malformed_references(tmp_path):
    copy = copy_fixture("nextqa", tmp_path)
    (copy / "map_vid_vidorID.json").write_text('{"4924794333": "1025/4924794333"}')
    with pytest.raises(ArtifactError, match=r"val.csv: row 3: video 3747890905 is not in .*map_vid_vidorID.json"):
        read_benchmark("nextqa", copy, "val")
    (copy / "map_vid_vidorID.json").write_text('{"6038769080": "1101/6038769080"}')
    (copy / "add_reference_answer_test.json").write_text('{"6038769080": ["brown"]}')
    with pytest.raises(ArtifactError, match=r"add_reference_answer_test.json: video 6038769080 should be"):
        read_benchmark("nextqa", copy, "test")
    (copy / "test.csv").write_text("video,question,answer,qid\n6038769080,q,a,1\n")
    with pytest.raises(ArtifactError, match=r"test.csv: no column type"):
        read_benchmark("nextqa", copy, "test")


def test_star_offers_its_choices_as_candidates_in_choice_order():
    records = read_benchmark("star", root("star"), "val")
    first = records[0]
    assert first["id"] == "star-Interaction_T1_13"
    assert first["video"] == str(root("star") / "Charades_v1_480" / "6H78U.mp4")
    assert first["candidates"] == ["The closet/cabinet.", "The blanket.", "The clothes.", "The table."]
    assert (first["label"], first["answer"], first["start"], first["end"]) == ("The closet/cabinet.",) * 2 + (11.1, 19.6)
    assert records[1]["label"] == "The book." and records[1]["start"] == 2.0
    (test,) = read_benchmark("star", root("star"), "test")
    assert "label" not in test and len(test["candidates"]) == 4  # unlabelled split


def test_star_answer_must_be_a_choice(tmp_path):
    copy = copy_fixture("star", tmp_path)
    items = json.loads((copy / "STAR_val.json").read_text())
    items[1]["answer"] = "The hat."
    (copy / "STAR_val.json").write_text(json.dumps(items))
    with pytest.raises(ArtifactError, match=r"question Sequence_T1_31: the answer 'The hat.' is not one of its choices"):
        read_benchmark("star", copy, "val")


def test_vatex_english_captions():
    records = read_benchmark("vatex", root("vatex"), "val")
    assert records[0] == {"id": "vatex-Ptf_2VRj-V0_000122_000132",
                          "video": str(root("vatex") / "videos" / "Ptf_2VRj-V0_000122_000132.mp4"), "split": "val",
                          "caption": "A man is playing a drum set.",
                          "captions": ["A man is playing a drum set.", "A person plays the drums in a room."],
                          "video_id": "Ptf_2VRj-V0_000122_000132"}
    assert [r["id"] for r in read_benchmark("vatex", root("vatex"), "test")] == ["vatex-Zz9_abcdeFG_000001_000011"]


def test_youcook2_one_record_per_segment_of_the_split():
    val = read_benchmark("youcook2", root("youcook2"), "val")
    assert [(r["id"], r["caption"], r["start"], r["end"]) for r in val] == [
        ("youcook2-GLd3aX16zBg-0", "spread margarine on two slices of white bread", 90.0, 102.0),
        ("youcook2-GLd3aX16zBg-1", "place a slice of cheese on the bread", 114.0, 127.5)]
    assert val[0]["video"] == str(root("youcook2") / "raw_videos" / "validation" / "113" / "GLd3aX16zBg.mp4")
    (train,) = read_benchmark("youcook2", root("youcook2"), "train")
    assert train["captions"] == ["boil the noodles"]


def test_youcook2_finds_the_container_youtube_dl_fetched(tmp_path):
    copy = copy_fixture("youcook2", tmp_path)
    folder = copy / "raw_videos" / "validation" / "113"
    folder.mkdir(parents=True)
    (folder / "GLd3aX16zBg.webm").write_bytes(b"")
    assert {r["video"] for r in read_benchmark("youcook2", copy, "val")} == {str(folder / "GLd3aX16zBg.webm")}
    (folder / "GLd3aX16zBg.mkv").write_bytes(b"")  # .mkv before .webm, as the download script checks
    assert {r["video"] for r in read_benchmark("youcook2", copy, "val")} == {str(folder / "GLd3aX16zBg.mkv")}


def test_youcook2_bad_segment(tmp_path):
    copy = copy_fixture("youcook2", tmp_path)
    data = json.loads((copy / "youcookii_annotations_trainval.json").read_text())
    data["database"]["xHr8X2Wpmno"]["annotations"][0]["segment"] = [5]
    (copy / "youcookii_annotations_trainval.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"video xHr8X2Wpmno, annotation 0: segment should be \[start, end\]"):
        read_benchmark("youcook2", copy, "train")


def test_rareact_rows_and_classes():
    records = read_benchmark("rareact", root("rareact"), "test")
    assert records[0] == {"id": "rareact-1", "video": str(root("rareact") / "videos" / "vA.mp4"), "split": "test",
                          "start": 0.0, "end": 2.0, "verb": "cut", "noun": "laptop", "label": "cut laptop",
                          "class_id": 0, "annotation": 1, "video_id": "vA"}
    from flamingo_cli.evaluation.benchmarks import rareact_classnames

    assert rareact_classnames(root("rareact")) == ["cut laptop", "blow leaf", "cut leaf"]


def test_rareact_bad_annotation(tmp_path):
    (tmp_path / "rareact.csv").write_text("id,video_id,start,end,class_id,verb,noun,annotation\n1,v,0,1,0,a,b,7\n")
    with pytest.raises(ArtifactError, match=r"rareact.csv: row 2: annotation should be 0 to 4, got 7"):
        read_benchmark("rareact", tmp_path, "test")
