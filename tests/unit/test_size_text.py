from loraflow.core.progress import size_text


def test_sizes_read_as_a_person_reads_them():
    assert size_text(10) == "10 B"
    assert size_text(543_200) == "530 KiB"  # the embedded merged model: not "0.00 GiB"
    assert size_text(1.86 * 2**30) == "1.86 GiB"
    assert size_text(5 * 2**40) == "5,120 GiB"
