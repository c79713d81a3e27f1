"""Dataset readers on small fixture files written in the real on-disk formats (spec 7, B.1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import upperson.data
from upperson.data import DatasetFormatError, DatasetNotFoundError, MissingSplitError, load_dataset, pre_caption


def write_jpeg(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16), color).save(path, format="JPEG")


def write_json(path: Path, records: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))


def person_records(path_field: str, rows: list[tuple[str, int, str, list[str]]]) -> list[dict]:
    return [
        {"split": split, "captions": captions, path_field: file, "id": pid, "processed_tokens": [c.split() for c in captions]}
        for split, pid, file, captions in rows
    ]


def write_person_dataset(directory: Path, annotation: str, path_field: str, rows: list[tuple[str, int, str, list[str]]]) -> None:
    write_json(directory / annotation, person_records(path_field, rows))
    for _, _, file, _ in rows:
        write_jpeg(directory / "imgs" / file)


CUHK_ROWS = [
    ("train", 1, "train_query/p1_s1.jpg", ["A woman in a red coat.", "She carries a bag."]),
    ("train", 3, "train_query/p3_s1.jpg", ["A man in grey.", "He wears jeans.", "Black shoes and a cap."]),
    ("train", 1, "CUHK01/p1_s2.jpg", ["The woman walks.", "Red coat, black boots."]),
    ("val", 5, "test_query/p5_s1.jpg", ["A child.", "Small person in blue."]),
    ("test", 7, "test_query/p7_s1.jpg", ["A tall man.", "He has a backpack."]),
    ("test", 7, "cam_a/p7_s2.jpg", ["The man again.", "Backpack and hat."]),
    ("test", 8, "cam_b/p8_s1.jpg", ["A girl.", "She wears a dress."]),
]


@pytest.fixture
def cuhk_root(tmp_path: Path) -> Path:
    write_person_dataset(tmp_path / "CUHK-PEDES", "reid_raw.json", "file_path", CUHK_ROWS)
    return tmp_path


def test_cuhk_train_one_sample_per_caption_with_contiguous_pids(cuhk_root: Path) -> None:
    dataset = load_dataset("cuhk-pedes", cuhk_root)
    assert dataset.name == "cuhk-pedes" and dataset.root == cuhk_root / "CUHK-PEDES"
    # ids 1, 3, 1 -> id - 1 = 0, 2, 0 -> renumbered by first appearance: 0, 1, 0
    assert [sample.pid for sample in dataset.train] == [0, 0, 1, 1, 1, 0, 0]
    assert [sample.image_id for sample in dataset.train] == [0, 0, 1, 1, 1, 2, 2]
    assert dataset.num_train_ids == 2
    assert [sample.caption for sample in dataset.train[2:5]] == ["A man in grey.", "He wears jeans.", "Black shoes and a cap."]
    assert dataset.train[0].image_path == cuhk_root / "CUHK-PEDES" / "imgs" / "train_query" / "p1_s1.jpg"
    assert all(sample.image_path.is_absolute() for sample in dataset.train)


def test_cuhk_eval_splits_keep_raw_ids(cuhk_root: Path) -> None:
    dataset = load_dataset("CUHK-PEDES", cuhk_root)
    test = dataset.split("test")
    assert test.image_pids == [7, 7, 8]
    assert test.caption_pids == [7, 7, 7, 7, 8, 8]
    assert test.captions[2] == "The man again."
    assert test.image_paths[1] == cuhk_root / "CUHK-PEDES" / "imgs" / "cam_a" / "p7_s2.jpg"
    val = dataset.split("val")
    assert (val.image_pids, val.caption_pids, len(val.image_paths)) == ([5], [5, 5], 1)
    assert set(dataset.splits) == {"val", "test"}


def test_root_may_be_the_dataset_directory(cuhk_root: Path) -> None:
    from_parent = load_dataset("cuhk-pedes", cuhk_root)
    from_folder = load_dataset("cuhk-pedes", cuhk_root / "CUHK-PEDES")
    assert from_parent.train == from_folder.train
    assert from_parent.split("test") == from_folder.split("test")


def test_already_contiguous_ids_keep_the_official_numbering(tmp_path: Path) -> None:
    rows = [("train", 2, "a.jpg", ["x"]), ("train", 1, "b.jpg", ["y"]), ("train", 3, "c.jpg", ["z"])]
    write_person_dataset(tmp_path / "CUHK-PEDES", "reid_raw.json", "file_path", rows + [("test", 9, "d.jpg", ["w"])])
    dataset = load_dataset("cuhk-pedes", tmp_path)
    assert [sample.pid for sample in dataset.train] == [1, 0, 2]  # id - 1, unchanged


def test_icfg_underscore_file_name_and_no_val_split(tmp_path: Path) -> None:
    rows = [
        ("train", 0, "train/0001/a.jpg", ["A man in a white shirt."]),
        ("train", 5, "train/0005/b.jpg", ["A woman with long hair."]),
        ("train", 0, "train/0001/c.jpg", ["The man from behind."]),
        ("test", 3000, "test/3000/d.jpg", ["Someone in black."]),
    ]
    write_person_dataset(tmp_path / "ICFG-PEDES", "ICFG_PEDES.json", "file_path", rows)
    dataset = load_dataset("icfg-pedes", tmp_path)
    assert [sample.pid for sample in dataset.train] == [0, 1, 0]
    assert [sample.image_id for sample in dataset.train] == [0, 1, 2]
    assert dataset.split("test").image_pids == [3000]
    assert list(dataset.splits) == ["test"]
    with pytest.raises(MissingSplitError, match="no 'val' split"):
        dataset.split("val")


def test_icfg_rejects_a_val_record(tmp_path: Path) -> None:
    rows = [("train", 0, "a.jpg", ["x"]), ("val", 1, "b.jpg", ["y"])]
    write_person_dataset(tmp_path / "ICFG-PEDES", "ICFG-PEDES.json", "file_path", rows)
    with pytest.raises(DatasetFormatError, match=r"ICFG-PEDES.json record 1: field 'split' must be one of 'train', 'test', got 'val'"):
        load_dataset("icfg-pedes", tmp_path)


def test_rstpreid_img_path_field(tmp_path: Path) -> None:
    rows = [
        ("train", 0, "0000_c14_0031.jpg", ["The man is wearing a grey jacket.", "A man in grey."]),
        ("train", 1, "0001_c2_0001.jpg", ["A woman in red.", "Red dress."]),
        ("val", 3702, "3702_c1_0001.jpg", ["A boy.", "Blue shirt."]),
        ("test", 3901, "3901_c5_0002.jpg", ["A lady.", "White hat."]),
    ]
    write_person_dataset(tmp_path / "RSTPReid", "data_captions.json", "img_path", rows)
    dataset = load_dataset("rstpreid", tmp_path / "RSTPReid")
    assert [sample.pid for sample in dataset.train] == [0, 0, 1, 1]
    assert dataset.train[0].image_path == tmp_path / "RSTPReid" / "imgs" / "0000_c14_0031.jpg"
    assert dataset.split("val").caption_pids == [3702, 3702]
    assert dataset.split("test").image_pids == [3901]


def test_pre_caption_rules() -> None:
    assert pre_caption("A Man, in a (red) T-shirt/jacket!  <person> ~said: \"hi\";") == "a man in a red t shirt jacket person said hi"
    assert pre_caption("  It's   two\tdogs.\n") == "its two dogs"


def albef_dataset(directory: Path, prefix: str, train_ids: list[object]) -> None:
    train = [
        {"image": f"train-images/{i}.jpg", "caption": f"Picture {n}: a DOG-like (toy)!", "image_id": image_id}
        for n, (i, image_id) in enumerate(zip([10, 11, 10], train_ids))
    ]
    val = [{"image": "val-images/20.jpg", "caption": ["A cat.", "The CAT sits.", "cat", "a cat/kitten", "cats!"]}]
    test = [
        {"image": "test-images/30.jpg", "caption": ["One.", "Two", "Three", "Four", "Five"]},
        {"image": "test-images/31.jpg", "caption": ["Six", "Seven", "Eight", "Nine", "Ten."]},
    ]
    for split, records in (("train", train), ("val", val), ("test", test)):
        write_json(directory / f"{prefix}_{split}.json", records)
        for record in records:
            write_jpeg(directory / record["image"])


def test_flickr30k_albef_format(tmp_path: Path) -> None:
    albef_dataset(tmp_path / "flickr30k", "flickr30k", [1007129816, 1009434119, 1007129816])
    dataset = load_dataset("flickr30k", tmp_path)
    assert [sample.pid for sample in dataset.train] == [0, 1, 0]
    assert [sample.image_id for sample in dataset.train] == [0, 1, 0]
    assert dataset.train[0].caption == "picture 0 a dog like toy"
    assert dataset.train[1].image_path == tmp_path / "flickr30k" / "train-images" / "11.jpg"
    test = dataset.split("test")
    assert test.image_pids == [0, 1]
    assert test.caption_pids == [0] * 5 + [1] * 5
    assert test.captions[:2] == ["one", "two"]
    assert dataset.split("val").captions == ["a cat", "the cat sits", "cat", "a cat kitten", "cats"]


def test_mscoco_string_image_ids(tmp_path: Path) -> None:
    albef_dataset(tmp_path / "MSCOCO", "coco", ["coco_123", "coco_45", "coco_123"])
    dataset = load_dataset("mscoco", tmp_path / "MSCOCO")
    assert [sample.pid for sample in dataset.train] == [0, 1, 0]
    assert dataset.num_train_ids == 2
    assert dataset.split("test").image_paths[1] == tmp_path / "MSCOCO" / "test-images" / "31.jpg"


def test_missing_annotation_file_names_the_expected_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"ICFG-PEDES.json or ICFG_PEDES.json.*<root>/ICFG-PEDES/ICFG-PEDES.json"):
        load_dataset("icfg-pedes", tmp_path)
    write_json(tmp_path / "flickr30k" / "flickr30k_train.json", [])
    with pytest.raises(DatasetNotFoundError, match=r"flickr30k lacks flickr30k_val.json, flickr30k_test.json"):
        load_dataset("flickr30k", tmp_path)


def test_malformed_record_names_file_index_and_field(cuhk_root: Path) -> None:
    path = cuhk_root / "CUHK-PEDES" / "reid_raw.json"
    records = json.loads(path.read_text())
    records[4]["captions"] = "a single string"
    write_json(path, records)
    with pytest.raises(DatasetFormatError, match=r"reid_raw.json record 4: field 'captions' must be a non-empty list of strings"):
        load_dataset("cuhk-pedes", cuhk_root)


def test_not_json_and_not_a_list(tmp_path: Path) -> None:
    (tmp_path / "RSTPReid").mkdir()
    (tmp_path / "RSTPReid" / "data_captions.json").write_text('[{"id": 0,')
    with pytest.raises(DatasetFormatError, match=r"data_captions.json: not valid JSON"):
        load_dataset("rstpreid", tmp_path)
    write_json(tmp_path / "RSTPReid" / "data_captions.json", {"annotations": []})
    with pytest.raises(DatasetFormatError, match=r"top level must be a JSON list of records, got dict"):
        load_dataset("rstpreid", tmp_path)


def test_registry_is_a_plain_dict_and_unknown_names_list_the_choices(tmp_path: Path) -> None:
    assert type(upperson.data.DATASETS) is dict
    assert list(upperson.data.DATASETS) == ["cuhk-pedes", "icfg-pedes", "rstpreid", "flickr30k", "mscoco"]
    with pytest.raises(ValueError, match="unknown dataset 'market1501'; choose one of cuhk-pedes, icfg-pedes"):
        load_dataset("market1501", tmp_path)


def test_caption_dataset_eval_images_also_in_train_or_twice_are_warnings(tmp_path: Path) -> None:
    albef_dataset(tmp_path / "flickr30k", "flickr30k", [1, 2, 1])
    path = tmp_path / "flickr30k" / "flickr30k_test.json"
    test = json.loads(path.read_text())
    test.append({"image": "train-images/11.jpg", "caption": ["a leak"]})
    test.append({"image": "test-images/30.jpg", "caption": ["the first one again"]})
    write_json(path, test)
    problems: list[upperson.data.Problem] = []
    upperson.data.DATASETS["flickr30k"](tmp_path, problems)
    assert sorted((problem.kind, problem.message) for problem in problems) == [
        ("duplicate_image", "test-images/30.jpg is the image of flickr30k_test.json records 0 (test) and 3 (test)"),
        ("duplicate_image", "train-images/11.jpg is the image of flickr30k_train.json record 1 (train) and flickr30k_test.json record 2 (test)"),
    ]  # images are their own identities here: no identity warnings, and train captions share images by design


def test_caption_dataset_val_without_captions_is_refused(tmp_path: Path) -> None:
    albef_dataset(tmp_path / "flickr30k", "flickr30k", [1, 2, 1])
    write_json(tmp_path / "flickr30k" / "flickr30k_val.json", [{"image": "val-images/20.jpg", "caption": ["!!", "..."]}])
    with pytest.raises(DatasetFormatError, match=r"flickr30k_val.json: the val split has 1 image but no caption \(all 2 are empty\)"):
        load_dataset("flickr30k", tmp_path)
