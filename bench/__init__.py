"""`make bench`: benchmark figures of issue 4, each with its baseline measured in the same run."""
