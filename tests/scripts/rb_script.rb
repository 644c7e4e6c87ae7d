#!/usr/bin/env ruby
# An RQ queue script in Ruby, written the way RQ's own scripts are.
$stdout.sync = true
write = IO.for_fd(ENV['RQ_WRITE'].to_i)
write.sync = true
read = IO.for_fd(ENV['RQ_READ'].to_i)
count = ENV['RQ_COUNT'].to_i
puts "ruby script #{ENV['RQ_MSG_ID']} count #{count}"
write.syswrite("run ruby here\n")
case ENV['RQ_PARAM1']
when 'done' then write.syswrite("done ruby done\n")
when 'err' then write.syswrite("err ruby err\n")
when 'sneaky' then write.syswrite("done ruby sneaky\n"); exit 1
when 'resend'
  if count < 2 then write.syswrite("resend 0-ruby retry\n") else write.syswrite("done ruby after #{count}\n") end
when 'dup'
  write.syswrite("dup 0-X-#{ENV['RQ_PARAM2']}\n")
  File.write(ENV['RQ_PARAM3'], read.gets)
  write.syswrite("done ruby dup\n")
when 'exit' then exit ENV['RQ_PARAM2'].to_i
else write.syswrite("err unknown\n")
end
