from pipeline.train.loop import epoch_line


def test_each_epoch_says_its_losses_its_pace_and_the_time_left():
    line = epoch_line(3, 15, {"loss": 0.24123, "pseudo": 0.5}, images=1600, epoch_seconds=8.0, loop_seconds=25.3)
    assert line == ("epoch 3/15 loss=0.2412 pseudo=0.5000 | 200 images/s | 25s in the loop, "
                    "about 1 min 36 s to go")
    assert epoch_line(15, 15, {"loss": 0.1}, 1600, 8.0, 120.0).endswith("| 120s in the loop")  # nothing left
